//! Throughput of sealing and opening transfer chunks (AES-256-GCM, see `nubis_proxy::seal`) on
//! this machine, per chunk size, on one core: `cargo run --release -p nubis-proxy --example
//! seal_bench [MiB]` (default 256 MiB per size).

use std::time::Instant;

use nubis_proxy::seal::ContentKey;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let total = mib << 20;
    let key = ContentKey::random();
    let object = "0123456789abcdef0123456789abcdef/disk-vda.qcow2";
    let sealer = key.sealer(object, 1);
    let opener = key.opener(object);
    println!("chunk size    seal MB/s    open MB/s   ({mib} MiB each)");
    for chunk in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let plain = vec![0x5au8; chunk];
        let n = (total / chunk) as u64;
        let t = Instant::now();
        let mut sealed = Vec::with_capacity(n as usize);
        for i in 0..n {
            let s = sealer.seal(i, &plain).unwrap_or_default();
            // Keep one chunk in eight to open below without holding every chunk in memory.
            if i % 8 == 0 {
                sealed.push((i, s));
            }
        }
        let seal = total as f64 / t.elapsed().as_secs_f64() / 1e6;
        let t = Instant::now();
        let mut opened = 0usize;
        for _ in 0..8 {
            for (i, s) in &sealed {
                opened += opener.open(*i, s).map(|p| p.len()).unwrap_or(0);
            }
        }
        let open = opened as f64 / t.elapsed().as_secs_f64() / 1e6;
        println!("{:>7} KiB {seal:>12.0} {open:>12.0}", chunk >> 10);
    }
}
