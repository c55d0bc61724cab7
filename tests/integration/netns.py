"""Separate hosts on one machine: Linux network namespaces joined by a bridge.

Each worker host gets its own namespace (its own interfaces, loopback and routes),
reached from the root namespace over a veth pair on a private bridge. The services
a real deployment would run on a third machine (API, Redis, PostgreSQL, S3) listen
on the bridge's address. Cutting a host off is taking its veth down: packets stop,
connections hang, exactly as when a cable or a switch port fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"radq-p{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    """One worker host: a namespace with one interface on the bridge."""

    name: str
    address: str
    veth: str  # its peer in the root namespace; down = the host is cut off

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut_off(self) -> None:
        _ip("link", "set", self.veth, "down")


@dataclass
class Network:
    """A bridge at ``<prefix>.1`` (the services' address) and hosts at ``.2``, ``.3``..."""

    prefix: str
    bridge: str
    hosts: list[Host] = field(default_factory=list)

    @property
    def services_address(self) -> str:
        return f"{self.prefix}.1"

    @classmethod
    def create(cls, hosts: int) -> Network:
        tag = uuid.uuid4().hex[:5]
        prefix = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
        net = cls(prefix, f"radqbr{tag}")
        try:
            _ip("link", "add", net.bridge, "type", "bridge")
            _ip("addr", "add", f"{net.services_address}/24", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            for i in range(hosts):
                host = Host(f"radq-{tag}-h{i + 1}", f"{prefix}.{i + 2}", f"radq{tag}v{i + 1}")
                _ip("netns", "add", host.name)
                net.hosts.append(host)
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
                _ip("link", "set", host.veth, "master", net.bridge, "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            net.remove()
            raise
        return net

    def remove(self) -> None:
        """Delete the namespaces (their veth pairs go with them) and the bridge."""
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class TcpForwarder:
    """Listens on ``listen`` and pipes every connection to ``target``.

    Puts a service bound to 127.0.0.1 (the machine's Redis and PostgreSQL) on the
    bridge address, where the hosts' namespaces can reach it.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-forwarder", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, listen_host, 0), self._loop
        ).result(timeout=10)
        self.address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def spawn_on(host: Host, args: list[str], *, env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """``radq <args>`` on ``host`` in a new process group, logging to ``log_file``."""
    import sys

    with log_file.open("ab") as log:
        return subprocess.Popen(
            host.command([sys.executable, "-m", "radq.cli", *args]),
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
