use ivy::channel::ChannelPath;
use ivy::storage::{Durability, Store, StoreOptions};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            durability: Durability::Never,
            ..Default::default()
        },
    )
    .unwrap();
    let path = ChannelPath::parse("/bench/a").unwrap();
    let data = vec![b'x'; 100];
    let t = std::time::Instant::now();
    for _ in 0..3_000_000 {
        store.append(&path, &data).unwrap();
    }
    store.flush().unwrap();
    eprintln!("{:.2} M/s", 3.0 / t.elapsed().as_secs_f64());
}
