"""Naive aiohttp reverse proxy (web.Application + ClientSession): the baseline in scripts/bench.

usage: python aiohttp_proxy.py PORT UPSTREAM_URL [--workers N]   (listens on 127.0.0.1:PORT)
N > 1 forks N processes that each bind the port with SO_REUSEPORT; SIGTERM to the parent stops them.
"""
import argparse, contextlib, os, signal
from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "host", "content-length"}

async def session(app):
    async with ClientSession(connector=TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False,
                             skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as app["session"]:
        yield

async def handle(req):
    headers = [(k, v) for k, v in req.headers.items() if k.lower() not in HOP]
    body = await req.read() if req.body_exists else None
    async with req.app["session"].request(req.method, req.app["upstream"] + req.rel_url.raw_path_qs,
                                          headers=headers, data=body, allow_redirects=False) as up:
        out = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP]
        return web.Response(status=up.status, reason=up.reason, headers=out, body=await up.read())

def serve(port, upstream):
    with contextlib.suppress(ImportError):
        import uvloop; uvloop.install()
    app = web.Application()
    app["upstream"] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, backlog=4096, access_log=None, print=None)

def run_forked(workers, serve, *args):
    """serve(*args) in this process (workers 1) or in that many forked children until SIGTERM or SIGINT."""
    if workers <= 1:
        return serve(*args)
    kids = []
    for _ in range(workers):
        if (pid := os.fork()) == 0:
            try: serve(*args)
            finally: os._exit(0)
        kids.append(pid)
    def stop(*_):
        for pid in kids:
            with contextlib.suppress(ProcessLookupError): os.kill(pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)
    for pid in kids:
        os.waitpid(pid, 0)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int); ap.add_argument("upstream"); ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    run_forked(a.workers, serve, a.port, a.upstream)

if __name__ == "__main__":
    main()
