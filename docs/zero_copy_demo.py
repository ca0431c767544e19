import sys, os, time, multiprocessing as mp
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import torch
def recv(q):
    from transport import Pipe
    p = Pipe.listen(); q.put(p.address); p.recv_tensor(); p.recv_tensor(); time.sleep(0.5); p.close()
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    r = ctx.Process(target=recv, args=(q,)); r.start()
    from transport import Pipe
    p = Pipe.connect(q.get()); p.send_tensor(torch.ones(64<<20, dtype=torch.uint8)); p.send_tensor(torch.ones(64<<20, dtype=torch.uint8)); p.close(); r.join()
