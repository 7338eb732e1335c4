#![allow(clippy::unwrap_used)] // a benchmark: a failure here should stop the run loudly

//! Micro-benchmarks of the per-message work on the proxy's hot path: framing a buffer of client
//! messages (what the relay does for every read) and parsing the messages it inspects.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use switchyard_pgwire::frame::{Frames, MessageLimits};
use switchyard_pgwire::frontend;

/// What `pgbench -S -M prepared` sends per transaction: Bind, Execute, Sync.
fn prepared_select_batch() -> BytesMut {
    let mut out = BytesMut::new();
    let mut msg = |tag: u8, body: &[u8]| {
        out.extend_from_slice(&[tag]);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
    };
    msg(b'B', b"\0P_0\0\0\x01\0\0\0\x051234\0\x01\0\x01");
    msg(b'E', b"\0\0\0\0\0");
    msg(b'S', b"");
    out
}

fn framing(c: &mut Criterion) {
    let batch = prepared_select_batch();
    let mut many = BytesMut::new();
    for _ in 0..64 {
        many.extend_from_slice(&batch);
    }
    let limits = MessageLimits::default();
    let mut group = c.benchmark_group("client_frames");
    group.throughput(Throughput::Bytes(many.len() as u64));
    group.bench_function("frame_and_parse_64_prepared_selects", |b| {
        b.iter(|| {
            let mut frames = Frames::new(black_box(&many), limits);
            let mut n = 0;
            for f in &mut frames {
                let (h, body) = f.unwrap();
                if frontend::parse(h.tag, body).is_ok() {
                    n += 1;
                }
            }
            assert_eq!(frames.consumed(), many.len());
            n
        })
    });
    group.finish();

    let query = {
        let mut out = BytesMut::new();
        frontend::query(
            &mut out,
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
        );
        out
    };
    c.bench_function("parse_simple_query", |b| {
        b.iter(|| {
            let (h, body) = Frames::new(black_box(&query), limits).next().unwrap().unwrap();
            frontend::parse(h.tag, body).unwrap()
        })
    });
}

criterion_group!(benches, framing);
criterion_main!(benches);
