import os

# hivemind reads its log level at import time; keep test output readable.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")

import signal

import pytest


@pytest.fixture
def make_harness(tmp_path):
    """Build loopback swarms for a test; on teardown stop them and prove no process of theirs survives."""
    from tests.support.swarm import Harness

    made: list[Harness] = []

    def make(run_id: str, **kwargs) -> Harness:
        h = Harness(str(tmp_path / f"swarm{len(made)}"), run_id, **kwargs)
        os.makedirs(h.workdir, exist_ok=True)
        made.append(h)
        return h

    yield make
    for h in made:
        for p in h.swarm.procs:  # a frozen process cannot act on SIGTERM
            if p.alive():
                os.kill(p.popen.pid, signal.SIGCONT)
        h.stop()
    left = [line for h in made for line in h.leftovers()]
    assert not left, f"processes survived teardown: {left}"
