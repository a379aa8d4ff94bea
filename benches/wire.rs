//! What the server spends printing events: `line::format_event` over a last-100 answer, as
//! `GET /events/PATH?n=100` builds its body (ids one nanosecond apart, 100 bytes of data), and
//! the same with data that needs escaping; and `line::escape_data` alone on short and large data.
//!
//! `cargo bench --bench wire`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ivy::event_id::EventId;
use ivy::wire::line;
use std::hint::black_box;

fn lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("format_event");
    group.throughput(Throughput::Elements(100));
    let plain = vec![b'h'; 100];
    let mut escaped = vec![b'h'; 100];
    escaped[50] = b'\n';
    escaped[99] = b'.';
    for (name, data) in [("plain_100B_x100", &plain), ("escaped_100B_x100", &escaped)] {
        let mut out = Vec::with_capacity(16 * 1024);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                for i in 0..100u64 {
                    let id = EventId(1_795_995_756_221_700_945 + i);
                    line::format_event(&mut out, black_box(id), "/hist/c", black_box(data));
                }
                black_box(out.len())
            })
        });
    }
    group.finish();
}

/// `line::escape_data` alone, on plain data of a short event and of a large one (64 KiB, the
/// default large-event threshold): its one-pass check must stay cheap for both.
fn escapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("escape_data");
    for size in [100usize, 64 * 1024] {
        let data = vec![b'h'; size];
        let mut out = Vec::with_capacity(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("plain_{size}B"), |b| {
            b.iter(|| {
                out.clear();
                line::escape_data(&mut out, black_box(&data));
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lines, escapes);
criterion_main!(benches);
