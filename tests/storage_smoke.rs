use ivy::channel::{ChannelPath, Selector};
use ivy::storage::{Durability, Query, Store, StoreOptions};

fn path(p: &str) -> ChannelPath {
    ChannelPath::parse(p).unwrap()
}

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { durability: Durability::Always, segment_bytes_max: 4096, ..StoreOptions::default() };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let mut ids = Vec::new();
    for i in 0..200 {
        let p = if i % 10 == 0 { "/quiet/a" } else { "/busy/b" };
        ids.push(store.append(&path(p), format!("event {i}").as_bytes()).unwrap());
    }
    let reader = store.reader(&Selector::parse("/quiet/a").unwrap());
    let got: Vec<_> = reader.events(&Query::last(5)).map(|e| e.unwrap().data.to_vec()).collect();
    assert_eq!(got, vec![b"event 190".to_vec(), b"event 180".to_vec(), b"event 170".to_vec(), b"event 160".to_vec(), b"event 150".to_vec()]);
    let reader = store.reader(&Selector::parse("/**").unwrap());
    let all: Vec<_> = reader.events(&Query::all()).map(|e| e.unwrap().id).collect();
    assert_eq!(all, ids);
    store.close().unwrap();
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    let reader = store.reader(&Selector::parse("/**").unwrap());
    let all: Vec<_> = reader.events(&Query::all()).map(|e| e.unwrap().id).collect();
    assert_eq!(all, ids);
    let reader = store.reader(&Selector::parse("/quiet/a").unwrap());
    let fwd: Vec<_> = reader.events(&Query::all()).map(|e| e.unwrap().id).collect();
    assert_eq!(fwd.len(), 20);
    let back: Vec<_> = reader.events(&Query { direction: ivy::storage::Direction::Backward, ..Query::all() }).map(|e| e.unwrap().id).collect();
    assert_eq!(back.len(), 20);
    let id = store.append(&path("/quiet/a"), b"after").unwrap();
    assert!(id > *ids.last().unwrap());
    println!("{:?}", store.stats().unwrap());
    println!("{:?}", store.channels(&ChannelPath::root()).unwrap());
}
