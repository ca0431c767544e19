"""32-layer lookup answer latency: a producer process serves N entries of 32 K + 32 V tensors; the consumer
fetches each by request id and reports the median and p90 round trip (run with PYTHONPATH = the tree to measure)."""
import multiprocessing as mp, os, statistics, sys, time
import torch

LAYERS, N = 32, int(sys.argv[3]) if len(sys.argv) > 3 else 300


def producer(q, size, tls):
    os.environ["UCX_TLS"] = tls
    from kv_transfer import LookupBuffer
    buf = LookupBuffer(4 << 30, lease_s=600)
    for i in range(N):
        kv = [torch.full((size,), i % 251, dtype=torch.uint8) for _ in range(LAYERS)]
        buf.insert(torch.tensor([i]), None, kv, [t.clone() for t in kv], None, request_id=f"r{i}")
    srv = buf.serve("127.0.0.1", 0)
    q.put(srv.address)
    q.get()  # until the consumer is done
    srv.close()


def main():
    size, tls = int(sys.argv[1]), sys.argv[2]
    os.environ["UCX_TLS"] = tls
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=producer, args=(q, size, tls))
    p.start()
    addr = q.get(timeout=300)
    from kv_transfer import LookupClient
    c = LookupClient(addr, timeout_s=60)
    lat = []
    for i in range(N):
        t0 = time.perf_counter()
        m = c.fetch(request_id=f"r{i}")
        lat.append(time.perf_counter() - t0)
        assert m is not None and len(m.key) == LAYERS and int(m.value[-1][0]) == i % 251
    c.close()
    q.put("done")
    p.join(60)
    lat = sorted(lat[N // 10:])
    print(f"{tls} layers={LAYERS} tensor={size}B: median {statistics.median(lat)*1e6:.0f} us, "
          f"p90 {lat[int(len(lat)*0.9)]*1e6:.0f} us ({len(lat)} fetches)")


if __name__ == "__main__":
    main()
