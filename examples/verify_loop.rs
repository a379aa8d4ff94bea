use ivy::channel::ChannelPath;
use ivy::storage::{verify, Durability, Store, StoreOptions};
fn main() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(
            dir.path(),
            StoreOptions {
                durability: Durability::Never,
                ..Default::default()
            },
        )
        .unwrap();
        let paths: Vec<ChannelPath> = (0..1000)
            .map(|i| ChannelPath::parse(&format!("/v/c{i}")).unwrap())
            .collect();
        let data = vec![b'v'; 100];
        for chunk in 0..300u64 {
            let batch: Vec<(&ChannelPath, &[u8])> = (0..10_000u64)
                .map(|i| (&paths[((chunk * 10_000 + i) % 1000) as usize], &data[..]))
                .collect();
            store.append_batch(&batch).unwrap();
        }
        store.close().unwrap();
    }
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let r = verify::verify(dir.path(), verify::Mode::Check, &|_| {}).unwrap();
        eprintln!(
            "{} bytes {:.0} MB/s",
            r.bytes,
            r.bytes as f64 / t.elapsed().as_secs_f64() / 1e6
        );
    }
}
