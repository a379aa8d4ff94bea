//! The HTTP rows of the protocol page.

use super::harness::*;
use ivy::config::ServerOptions;
use ivy::storage::StoreOptions;

async fn seed(server: &TestServer) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, p) in [
        "/rooms/a/chat",
        "/rooms/b/chat",
        "/rooms/a",
        "/logs/x",
        "/rooms/a/chat",
    ]
    .iter()
    .enumerate()
    {
        ids.push(post(server, p, format!("m{i}").as_bytes()).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_n_at_globs_subtrees() {
    let server = start().await;
    let ids = seed(&server).await;
    let all = get(&server, "/events/rooms/a/chat").await;
    assert_eq!(all.status, 200);
    assert_eq!(
        all.text(),
        format!("{}:/rooms/a/chat:m0\n{}:/rooms/a/chat:m4\n", ids[0], ids[4])
    );
    assert_eq!(
        get(&server, "/log/rooms/a/chat?n=1").await.text(),
        format!("{}:/rooms/a/chat:m4\n", ids[4])
    );
    let ts = |i: usize| ids[i].trim_start_matches('@').to_owned();
    assert_eq!(
        get(&server, &format!("/events/rooms/a/chat?at={}", ts(0)))
            .await
            .text()
            .lines()
            .count(),
        1
    );
    assert_eq!(
        get(&server, &format!("/events/rooms/a/chat?at=@{}", ts(0)))
            .await
            .text()
            .lines()
            .count(),
        1
    );
    let up_to = get(&server, &format!("/events/rooms/a/chat?at={}&n=5", ts(4)))
        .await
        .text();
    assert_eq!(up_to.lines().count(), 2);
    let glob = get(&server, "/events/rooms/*/chat").await.text();
    let lines: Vec<_> = glob.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{}:/rooms/a/chat:m0", ids[0]),
            format!("{}:/rooms/b/chat:m1", ids[1]),
            format!("{}:/rooms/a/chat:m4", ids[4])
        ]
    );
    assert_eq!(
        get(&server, "/events/rooms/**")
            .await
            .text()
            .lines()
            .count(),
        4
    );
    assert_eq!(get(&server, "/events/**").await.text().lines().count(), 5);
    let empty = get(&server, "/events/nothing/here").await;
    assert_eq!((empty.status, empty.text()), (200, String::new()));
    for bad in [
        "/events/rooms/**/chat",
        "/events/rooms/x*",
        "/events/rooms/*/",
    ] {
        let r = get(&server, bad).await;
        assert_eq!(
            (r.status, r.text()),
            (400, "invalid glob path\n".to_string()),
            "{bad}"
        );
    }
    for (bad, reason) in [
        ("?n=0", "invalid line count"),
        ("?n=abc", "invalid line count"),
        ("?at=yesterday", "invalid timestamp"),
    ] {
        let r = get(&server, &format!("/events/rooms/a{bad}")).await;
        assert_eq!(r.status, 400);
        assert!(r.text().starts_with(reason), "{bad}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_paging_and_caching() {
    let server = start().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(post(&server, "/p", format!("e{i}").as_bytes()).await);
    }
    let ts = |i: usize| ids[i].trim_start_matches('@').to_owned();
    let r = get(
        &server,
        &format!("/events/p?since={}&until={}", ts(2), ts(5)),
    )
    .await;
    assert_eq!(r.text().lines().count(), 4);
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let r = get(&server, &format!("/events/p?after={}", ts(2))).await;
    assert_eq!(r.text().lines().count(), 7);
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let r = get(
        &server,
        &format!("/events/p?since={}&until={}", ts(5), ts(2)),
    )
    .await;
    assert_eq!((r.status, r.text()), (200, String::new()));
    // Paging with limit: a Link to the next page, until the end.
    let mut url = "/events/p?limit=4".to_string();
    let mut pages = Vec::new();
    loop {
        let r = get(&server, &url).await;
        pages.push(r.text());
        match r.header("link") {
            Some(link) => {
                url = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned()
            }
            None => break,
        }
    }
    assert_eq!(
        pages.iter().map(|p| p.lines().count()).collect::<Vec<_>>(),
        [4, 4, 2]
    );
    assert_eq!(pages.concat(), get(&server, "/events/p").await.text());
    // ETag and If-None-Match; Last-Modified and If-Modified-Since; HEAD; Range.
    let r = get(&server, "/events/p?n=3").await;
    let etag = r.header("etag").unwrap().to_owned();
    let lm = r.header("last-modified").unwrap().to_owned();
    assert_eq!(
        get_with(&server, "/events/p?n=3", &[("If-None-Match", &etag)])
            .await
            .status,
        304
    );
    assert_eq!(
        get_with(&server, "/events/p?n=3", &[("If-Modified-Since", &lm)])
            .await
            .status,
        304
    );
    // If-None-Match compares weakly; If-Modified-Since compares dates, not text, and is
    // ignored when it does not parse or when If-None-Match is there.
    let weak = format!("W/{etag}");
    let p3 = "/events/p?n=3";
    assert_eq!(
        status_of(&server, p3, &[("If-None-Match", &weak)]).await,
        304
    );
    let later = "Fri, 01 Jan 2100 00:00:00 GMT";
    let earlier = "Thu, 01 Jan 1970 00:00:00 GMT";
    assert_eq!(
        status_of(&server, p3, &[("If-Modified-Since", later)]).await,
        304
    );
    assert_eq!(
        status_of(&server, p3, &[("If-Modified-Since", earlier)]).await,
        200
    );
    assert_eq!(
        status_of(&server, p3, &[("If-Modified-Since", "yesterday")]).await,
        200
    );
    assert_eq!(
        status_of(
            &server,
            p3,
            &[("If-None-Match", "\"other\""), ("If-Modified-Since", later)]
        )
        .await,
        200
    );
    let head = http(&server, "HEAD", "/events/p?n=3", &[], b"").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    let part = get_with(&server, "/events/p?n=3", &[("Range", "bytes=0-9")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, r.body[..10]);
    assert_eq!(
        get_with(&server, "/events/p?n=3", &[("Range", "bytes=9999-")])
            .await
            .status,
        416
    );
    // What is not offered (several ranges, another unit) or does not parse gets everything.
    for range in ["bytes=0-1,3-4", "items=0-1", "bytes=abc", "bytes=5-3"] {
        let whole = get_with(&server, "/events/p?n=3", &[("Range", range)]).await;
        assert_eq!((whole.status, &whole.body), (200, &r.body), "{range}");
    }
    // If-Range: the part only while the client's tag is still the answer's.
    let if_range = |tag| [("Range", "bytes=0-9"), ("If-Range", tag)];
    assert_eq!(status_of(&server, p3, &if_range(&etag)).await, 206);
    assert_eq!(status_of(&server, p3, &if_range("\"other\"")).await, 200);
    assert_eq!(status_of(&server, p3, &if_range(&weak)).await, 200);
    // A date validates only an answer that can never change.
    assert_eq!(status_of(&server, p3, &if_range(&lm)).await, 200);
    let first = r
        .text()
        .split(':')
        .next()
        .unwrap()
        .trim_start_matches('@')
        .to_owned();
    let past = format!("/events/p?until={first}");
    let fixed = get(&server, &past).await;
    assert!(fixed.header("cache-control").unwrap().contains("immutable"));
    let fixed_lm = fixed.header("last-modified").unwrap();
    assert_eq!(status_of(&server, &past, &if_range(fixed_lm)).await, 206);
    post(&server, "/p", b"newer").await;
    assert_eq!(
        get_with(&server, "/events/p?n=3", &[("If-None-Match", &etag)])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_stream_completely() {
    let server = start().await;
    let mut p = ws(&server).await;
    let data = "d".repeat(900);
    for i in 0..1500 {
        p.send(&format!(":/bulk:{i}:{data}")).await;
    }
    p.request("k", ":/bulk:last").await;
    let r = get(&server, "/events/bulk").await;
    assert_eq!(r.text().lines().count(), 1501);
    assert!(r.body.len() > 1_000_000);
    let r = get(&server, "/events/bulk?limit=1200").await;
    assert_eq!(r.text().lines().count(), 1200);
    assert!(r.header("link").is_some());
    // Last-N past the inline size is streamed too (chunked), oldest first, exactly N lines:
    // the same bytes as the tail of the whole answer.
    let all = get(&server, "/events/bulk").await.text();
    let lines: Vec<&str> = all.lines().collect();
    for n in [1501, 1000, 300, 10] {
        let r = get(&server, &format!("/events/bulk?n={n}")).await;
        assert_eq!(r.status, 200);
        let tail = lines[lines.len() - n..].join("\n") + "\n";
        assert!(
            r.text() == tail,
            "n={n}: {} lines",
            r.text().lines().count()
        );
        let is_streamed = r.header("transfer-encoding") == Some("chunked");
        assert_eq!(is_streamed, n >= 300, "n={n}");
        assert_eq!(
            r.header("last-modified"),
            get(&server, "/events/bulk?n=1")
                .await
                .header("last-modified")
        );
    }
    // More than there are: all of them. With `at`: the N up to and including it.
    assert_eq!(get(&server, "/events/bulk?n=1000000").await.text(), all);
    let at = lines[1199]
        .split(':')
        .next()
        .unwrap()
        .trim_start_matches('@');
    let r = get(&server, &format!("/events/bulk?at={at}&n=900")).await;
    assert!(r.text() == lines[300..1200].join("\n") + "\n");
    let r = http(&server, "HEAD", "/events/bulk?n=1000", &[], b"").await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    // Events of mixed sizes, some too large to join a chunk that holds others already: each
    // chunk ends between whole lines, and a limit counts across them.
    let sizes = [20_000, 45_000, 60_000, 1_000, 30_000, 5];
    for i in 0..60 {
        let data = format!("{i}:{}", "m".repeat(sizes[i % sizes.len()]));
        post(&server, "/mixed", data.as_bytes()).await;
    }
    let all = get(&server, "/events/mixed").await.text();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 60);
    for (i, line) in lines.iter().enumerate() {
        let data = line.split_once(":/mixed:").unwrap().1;
        assert_eq!(data, format!("{i}:{}", "m".repeat(sizes[i % sizes.len()])));
    }
    for limit in [1, 7, 20, 59] {
        let r = get(&server, &format!("/events/mixed?limit={limit}")).await;
        assert!(
            r.text() == lines[..limit].join("\n") + "\n",
            "limit={limit}"
        );
        let r = get(&server, &format!("/events/mixed?n={limit}")).await;
        assert!(
            r.text() == lines[60 - limit..].join("\n") + "\n",
            "n={limit}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_forms_sid_and_limits() {
    let opts = ServerOptions {
        body_bytes_max: 1000,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut me = ws(&server).await;
    me.request("s", "+/f").await;
    let mut other = ws(&server).await;
    other.request("s", "+/f").await;
    // urlencoded with my sid: I do not get it back; the other does.
    let body = format!("data=a%0Ab&sid={}", me.sid);
    let r = http(
        &server,
        "POST",
        "/events/f",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let id = r.text().trim().to_owned();
    assert_eq!(other.recv().await, format!("{id}:/f:a%0Ab"));
    // Multipart, as the original client's sendLarge sends it (CRLF line breaks kept).
    let boundary = "XyZ";
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\n{}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nline1\r\nline2\r\n--{boundary}--\r\n",
        me.sid
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = http(
        &server,
        "POST",
        "/events/f",
        &[("Content-Type", &ct)],
        multipart.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.text().trim().to_owned();
    assert_eq!(other.recv().await, format!("{id}:/f:line1%0D%0Aline2"));
    assert_eq!(
        me.quiet_for(std::time::Duration::from_millis(300)).await,
        None
    );
    // Refusals.
    assert_eq!(try_post(&server, "/f", &[b'x'; 1001]).await.0, 413);
    assert_eq!(try_post(&server, "/F", b"x").await.0, 400);
    assert_eq!(try_post(&server, "/a/../b", b"x").await.0, 400);
    assert_eq!(
        http(
            &server,
            "POST",
            "/events/f",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"nodata=1"
        )
        .await
        .status,
        400
    );
    // A field given twice is ambiguous: refused, and nothing is stored.
    let twice = http(
        &server,
        "POST",
        "/events/twice",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"data=a&data=b",
    )
    .await;
    assert_eq!(
        (twice.status, twice.text()),
        (400, "duplicate form field data\n".to_owned())
    );
    assert_eq!(get(&server, "/events/twice").await.body, b"");
    // Every 405 names what the resource allows (RFC 9110 15.5.6).
    for (method, path, allow) in [
        ("DELETE", "/events/f", "GET, HEAD, POST, OPTIONS"),
        ("POST", "/log/f", "GET, HEAD, OPTIONS"),
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("POST", "/ws", "GET"),
    ] {
        let r = http(&server, method, path, &[], b"").await;
        assert_eq!(
            (r.status, r.header("allow")),
            (405, Some(allow)),
            "{method} {path}"
        );
    }
    let not_upgrade = get_with(&server, "/ws", &[]).await;
    assert_eq!(
        (not_upgrade.status, not_upgrade.header("upgrade")),
        (426, Some("websocket"))
    );
    assert_eq!(get_with(&server, "/nope", &[]).await.status, 404);
    assert_eq!(get_with(&server, "/healthz", &[]).await.status, 200);
    // A root publish works (the original panicked on it); the answer is a text line.
    let root = http(
        &server,
        "POST",
        "/events/",
        &[("Content-Type", "text/plain")],
        b"root",
    )
    .await;
    assert_eq!(
        (root.status, root.header("content-type")),
        (200, Some("text/plain; charset=utf-8"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_give_commit_batches_and_fsync_times() {
    let server = start().await;
    // Each POST is answered once durable, so each of these is a round of its own.
    seed(&server).await;
    assert_eq!(metric(&server, "ivy_commit_round_events_sum").await, 5);
    let rounds = metric(&server, "ivy_commit_round_events_count").await;
    assert!((1..=5).contains(&rounds), "{rounds} rounds");
    assert_eq!(
        metric(&server, r#"ivy_commit_round_events_bucket{le="1.0"}"#).await,
        rounds
    );
    assert_eq!(
        metric(&server, "ivy_commit_round_seconds_count").await,
        rounds
    );
    // Under `always` every round syncs its segment; the counter and the histogram agree.
    let fsyncs = metric(&server, "ivy_fsync_seconds_count").await;
    assert!(fsyncs >= rounds, "{fsyncs} fsyncs for {rounds} rounds");
    assert_eq!(metric(&server, "ivy_fsyncs_total").await, fsyncs);
    assert_eq!(
        metric(&server, r#"ivy_fsync_seconds_bucket{le="+Inf"}"#).await,
        fsyncs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_every_spelling_is_400() {
    let server = start().await;
    for path in [
        "/events/..",
        "/events/../etc",
        "/events/%2e%2e",
        "/events/%2E%2E/x",
        "/events/a/%2F/b",
        "/events/./a",
        "/events/a//b",
        "/events/a%00",
        "/events/%c3%a9",
        "/events/A",
    ] {
        let r = get(&server, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let r = http(
            &server,
            "POST",
            path,
            &[("Content-Type", "text/plain")],
            b"x",
        )
        .await;
        assert_eq!(r.status, 400, "POST {path}");
    }
    let long = format!("/events/{}", "a".repeat(300));
    assert_eq!(get(&server, &long).await.status, 400);
    let deep = format!("/events{}", "/a".repeat(40));
    assert_eq!(get(&server, &deep).await.status, 400);
    let streams = std::fs::read_dir(server.dir.join("streams"))
        .unwrap()
        .count();
    assert_eq!(streams, 0, "no stream directory was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_foreign_posts() {
    let server = start().await;
    let r = http(
        &server,
        "POST",
        "/events/x",
        &[
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        b"x",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http(
        &server,
        "OPTIONS",
        "/events/x",
        &[("Origin", "http://evil.example")],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = get(&server, "/events/x").await;
    assert!(r.header("access-control-allow-origin").is_none());
    let opts = ServerOptions {
        origins: ivy::config::OriginPolicy::from_list(&["http://app.example".into()]),
        ..ServerOptions::default()
    };
    let listed = start_with(opts, StoreOptions::default()).await;
    let r = http(
        &listed,
        "OPTIONS",
        "/events/x",
        &[("Origin", "http://app.example")],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    let r = http(
        &listed,
        "POST",
        "/events/x",
        &[
            ("Origin", "http://app.example"),
            ("Content-Type", "text/plain"),
        ],
        b"x",
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Reads that reach back into sealed segments are read on a blocking thread (their pages may
/// have to come from the disk), and answer exactly as reads of the live segment do: last N,
/// ranges, `at`, globs, subtrees and pages, across many small segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_reach_sealed_segments_are_whole() {
    let store_opts = StoreOptions {
        segment_bytes_max: 4096,
        index_interval_bytes: 512,
        preallocate: false,
        ..StoreOptions::default()
    };
    let server = start_with(ServerOptions::default(), store_opts).await;
    let paths = ["/old/a", "/old/b", "/old/a/deep"];
    let mut published: Vec<(String, &str)> = Vec::new();
    for i in 0..240 {
        let p = paths[i % paths.len()];
        published.push((
            id_of(&post(&server, p, format!("e{i}").as_bytes()).await),
            p,
        ));
    }
    let of = |p: &str| -> Vec<String> {
        published
            .iter()
            .filter(|(_, q)| *q == p)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let read = |query: String| {
        let server = &server;
        async move {
            let r = get(server, &query).await;
            assert_eq!(r.status, 200, "{query}: {}", r.text());
            r.text()
                .lines()
                .map(|l| id_of(l.split(':').next().unwrap_or("")))
                .collect::<Vec<_>>()
        }
    };
    let a = of("/old/a");
    // The newest event is in the live segment: read where the request is.
    let deep = of("/old/a/deep");
    assert_eq!(read("/events/old/a/deep?n=1".into()).await, deep[79..]);
    assert_eq!(metric(&server, "ivy_sealed_reads_total").await, 0);
    assert_eq!(read("/events/old/a".into()).await, a);
    assert_eq!(metric(&server, "ivy_sealed_reads_total").await, 1);
    assert_eq!(read("/events/old/a?n=75".into()).await, a[5..]);
    assert_eq!(read("/events/old/a?n=2".into()).await, a[78..]);
    assert_eq!(read(format!("/events/old/a?at={}", a[3])).await, a[3..4]);
    assert_eq!(
        read(format!("/events/old/a?at={}&n=3", a[40])).await,
        a[38..41]
    );
    assert_eq!(
        read(format!("/events/old/a?since={}&until={}", a[1], a[9])).await,
        a[1..10]
    );
    let all: Vec<String> = published.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(read("/events/old/**".into()).await, all);
    assert_eq!(
        read(format!("/events/old/**?after={}", all[7])).await,
        all[8..]
    );
    let globbed: Vec<String> = published
        .iter()
        .filter(|(_, p)| *p != "/old/a/deep")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(read("/events/old/*".into()).await, globbed);
    // Pages of 50 from the start: each `Link` leads on, and together they are the whole.
    let mut paged = Vec::new();
    let mut next = Some("/events/old/**?limit=50".to_string());
    while let Some(query) = next {
        let r = get(&server, &query).await;
        assert_eq!(r.status, 200, "{}", r.text());
        paged.extend(
            r.text()
                .lines()
                .map(|l| id_of(l.split(':').next().unwrap_or(""))),
        );
        next = r
            .header("link")
            .and_then(|l| Some(l.strip_prefix('<')?.split_once('>')?.0.to_string()));
    }
    assert_eq!(paged, all);
}
