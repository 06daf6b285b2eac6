"""connect_redis follows a Sentinel-managed master: the store works through a real redis-sentinel."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from vitaserve.common.session_store import SessionConfig, SessionStore, connect_redis

from servers import free_port, redis_server


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing (scripts/setup.sh)")
def test_store_through_sentinel(tmp_path):
    with redis_server(tmp_path) as url:
        master_port = int(url.rsplit(":", 1)[1].split("/")[0])
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor vita 127.0.0.1 {master_port} 1\n")
        proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        try:
            async def main():
                store = SessionStore(connect_redis(f"redis+sentinel://127.0.0.1:{port}/vita/0"))
                for _ in range(100):  # the sentinel needs a moment to learn its master
                    try:
                        sid = await store.create(SessionConfig(mode="boost", codec="mulaw", sample_rate=8000))
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                record = await store.get(sid)
                await store.redis.aclose()
                return record

            record = asyncio.run(main())
            assert record.config.mode == "boost"
        finally:
            proc.terminate()
            proc.wait(10)


def test_bad_sentinel_url_is_explained():
    with pytest.raises(ValueError, match="sentinel URL looks like"):
        connect_redis("redis+sentinel://127.0.0.1:26379")
