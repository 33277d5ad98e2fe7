import pytest

from tests.agents import Topology


@pytest.fixture
def topology(tmp_path, request):
    """Factory of started Topologies; every agent is killed at the end, even on failure,
    and agent logs are printed when the test failed."""
    made = []

    def make(*args, start=True, **kwargs):
        topo = Topology(tmp_path, *args, **kwargs)
        made.append(topo)
        return topo.start() if start else topo

    yield make
    failed = getattr(request.node, "rep_call", None)
    for topo in made:
        if failed is not None and failed.failed:
            print(topo.logs())
        topo.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
