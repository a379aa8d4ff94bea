//! The answer cache (`server/http/cache.rs`): a read asked again while its streams published
//! nothing is sent from the cache, exactly as it was built; once they publish, it is read again.

use super::harness::*;
use ivy::config::ServerOptions;
use ivy::storage::StoreOptions;

async fn hits(server: &TestServer) -> u64 {
    metric(server, "ivy_answer_cache_hits_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_answer_is_sent_again_only_while_its_streams_publish_nothing() {
    let server = start().await;
    for i in 0..3 {
        post(&server, "/a/x", format!("m{i}").as_bytes()).await;
    }
    let q = "/events/a/x?n=2";
    let first = get(&server, q).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.text().lines().count(), 2);
    let tag = first.header("etag").expect("an etag").to_owned();
    let before = hits(&server).await;

    // Asked again, in every way a client may ask: the same answer, from the cache.
    let again = get(&server, q).await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    for name in [
        "etag",
        "last-modified",
        "cache-control",
        "content-length",
        "content-type",
    ] {
        assert_eq!(again.header(name), first.header(name), "{name}");
    }
    let head = http(&server, "HEAD", q, &[], b"").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        first.header("content-length")
    );
    let part = get_with(&server, q, &[("Range", "bytes=0-9")]).await;
    assert_eq!((part.status, &part.body[..]), (206, &first.body[..10]));
    assert_eq!(status_of(&server, q, &[("If-None-Match", &tag)]).await, 304);
    assert_eq!(hits(&server).await, before + 4);
    // `/log` is another request with the same answer.
    assert_eq!(get(&server, "/log/a/x?n=2").await.body, first.body);
    assert_eq!(hits(&server).await, before + 4);

    // A commit in another stream changes nothing this answer holds by: still the same answer,
    // tag and all, from the cache.
    post(&server, "/b/y", b"elsewhere").await;
    let after_other = get(&server, q).await;
    assert_eq!((after_other.status, &after_other.body), (200, &first.body));
    assert_eq!(after_other.header("etag"), Some(tag.as_str()));
    assert_eq!(status_of(&server, q, &[("If-None-Match", &tag)]).await, 304);
    assert_eq!(hits(&server).await, before + 6);

    // A commit in its own stream (`/a`, at the default stream depth of 1), on another channel:
    // read again, the same events under a new tag.
    post(&server, "/a/z", b"beside").await;
    let after_beside = get(&server, q).await;
    assert_eq!(
        (after_beside.status, &after_beside.body),
        (200, &first.body)
    );
    assert_ne!(after_beside.header("etag"), Some(tag.as_str()));
    assert_eq!(status_of(&server, q, &[("If-None-Match", &tag)]).await, 200);
    assert_eq!(hits(&server).await, before + 7);

    // A commit in this channel: the new event is there at once.
    let id = post(&server, "/a/x", b"newest").await;
    let after_own = get(&server, q).await.text();
    let last = after_own.lines().last().unwrap_or("");
    assert_eq!(last, format!("@{}:/a/x:newest", id_of(&id)));
    assert_eq!(hits(&server).await, before + 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_read_is_built() {
    let opts = ServerOptions {
        answer_cache_bytes: 0,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    post(&server, "/a/x", b"m").await;
    let first = get(&server, "/events/a/x?n=1").await;
    let again = get(&server, "/events/a/x?n=1").await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(hits(&server).await, 0);
    assert_eq!(metric(&server, "ivy_answer_cache_misses_total").await, 2);
}

/// Writers in several streams, each reading its own channel's newest event after every
/// acknowledged write, while readers keep the same requests in the cache: no answer may be older
/// than a write its reader saw acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_gets_an_answer_older_than_an_acknowledged_write() {
    let server = std::sync::Arc::new(start().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (server, stop) = (server.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            // What this reader saw last of each request: it may never go back.
            let mut newest = std::collections::HashMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for q in (0..4)
                    .map(|w| format!("/events/w{w}/c?n=1"))
                    .chain(["/events/**?n=5".to_string()])
                {
                    let answer = get(&server, &q).await;
                    assert_eq!(answer.status, 200, "reader {r}: {q}");
                    let text = answer.text();
                    let last = text.lines().last().unwrap_or("").split(':').next();
                    let last = id_of(last.unwrap_or(""));
                    let before = newest.insert(q.clone(), last.clone()).unwrap_or_default();
                    assert!(
                        last >= before,
                        "reader {r}: {q} went back, {before} -> {last}"
                    );
                }
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..4 {
        let server = server.clone();
        writers.push(tokio::spawn(async move {
            let q = format!("/events/w{w}/c?n=1");
            for i in 0..40 {
                let id =
                    id_of(&post(&server, &format!("/w{w}/c"), format!("{i}").as_bytes()).await);
                let newest = get(&server, &q).await.text();
                assert_eq!(newest, format!("@{id}:/w{w}/c:{i}\n"), "writer {w}");
                // Across streams, the newest is this write or a later one.
                let all = get(&server, "/events/**?n=1").await.text();
                let seen = id_of(all.split(':').next().unwrap_or(""));
                assert!(seen.as_str() >= id.as_str(), "{seen} < {id}");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    assert!(hits(&server).await > 0, "the readers never hit the cache");
}
