"""A simulated multi-node Ray cluster for tests: several raylets on this machine, each a "node" we can kill.

It runs Ray's own ``ray.cluster_utils.Cluster`` in a child process (``python tests/sim_cluster.py``)
driven by JSON lines on stdin/stdout, so a test process that already has a local Ray (the
``ray_session`` fixture) never mixes the two.  Everything lives under one private temp dir
(``RAY_TMPDIR``), the cluster talks on 127.0.0.1 only, and :meth:`SimCluster.close` kills every process
whose command line names that dir -- never anybody else's Ray (no global ``ray stop``).

Killing a node (:meth:`SimCluster.kill`) SIGKILLs its raylet and every worker process under it at once,
as a lost machine would; Ray learns of it through its GCS health checks, which the head runs every
0.5 s here (1 s timeout, 3 misses) instead of Ray's slower defaults, to keep tests short.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3,
          "health_check_initial_delay_ms": 0}


def processes_under(root: str) -> list[int]:
    """PIDs of processes whose command line names ``root`` (our cluster's temp dir)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    me = os.getpid()
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if root in line and "ps -ww" not in line and int(line.split()[0]) != me]


class SimCluster:
    """Test-side handle: ``SimCluster(head_cpus=0)``, ``add(cpus)`` -> node id, ``kill(node)``, ``close()``.

    ``env`` is the environment for processes that join it (``r3-rl train ... --set ray.address=ADDRESS``).
    """

    def __init__(self, head_cpus: int = 0, timeout_s: float = 90.0) -> None:
        self.root = tempfile.mkdtemp(prefix="r3cl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's "local" IP is then 127.0.0.1 (as on a laptop) for every
        # process, the driver included; otherwise Ray swaps 127.0.0.1 for the machine's outward address
        self.env = {**os.environ, "RAY_TMPDIR": self.root, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen([sys.executable, __file__, str(head_cpus)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        try:
            hello = self._reply()
        except BaseException:
            self.close()
            raise
        self.address, self.head = hello["address"], hello["node"]
        self.nodes: list[str] = []  # live nodes added with add(), in order

    def _reply(self) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"simulated cluster did not answer within {self.timeout_s:g} s")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"simulated cluster: {msg['error']}")
        return msg

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def add(self, cpus: int) -> str:
        """Start one more node with ``cpus`` CPUs; returns its node ID once it has joined."""
        node = self._ask(op="add", cpus=cpus)["node"]
        self.nodes.append(node)
        return node

    def kill(self, node: str) -> list[int]:
        """SIGKILL node ``node``'s raylet and its workers; returns the PIDs killed."""
        self.nodes.remove(node)
        return self._ask(op="kill", node=node)["killed"]

    def close(self) -> None:
        """Stop the cluster; then kill whatever it started that is still alive (raylets' workers included:
        Ray renames those ``ray::...``, so they cannot be found by the temp dir in their command line)."""
        import psutil

        try:
            ours = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ours = []
        if self.proc.poll() is None:
            try:
                self._ask(op="quit")
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        deadline = time.time() + 10
        while processes_under(self.root) and time.time() < deadline:
            time.sleep(0.5)
        for pid in processes_under(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in ours:
            try:
                p.kill()  # psutil checks it is still the same process (no PID reuse)
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SimCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------- the child process
def _serve(head_cpus: int) -> None:
    import psutil
    from ray.cluster_utils import Cluster

    def say(**msg: Any) -> None:
        print(json.dumps(msg), flush=True)

    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": head_cpus, "include_dashboard": False, "_system_config": HEALTH})
    nodes = {cluster.head_node.node_id: cluster.head_node}
    say(address=cluster.address, node=cluster.head_node.node_id)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "add":
                node = cluster.add_node(num_cpus=cmd["cpus"], **common)
                nodes[node.node_id] = node
                say(node=node.node_id)
            elif cmd["op"] == "kill":
                node = nodes.pop(cmd["node"])
                raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
                doomed = [raylet] + raylet.children(recursive=True)
                for p in doomed:  # all at once, as a lost machine: no graceful shutdown of anything
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                cluster.remove_node(node, allow_graceful=False)  # its other daemons (agents, log monitor)
                say(killed=[p.pid for p in doomed])
            elif cmd["op"] == "quit":
                break
        except Exception as e:  # report it to the test, keep serving
            say(error=f"{type(e).__name__}: {e}")
    # "quit", or stdin closed because the test process died: never outlive it
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    say(done=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
