"""Federation config: composition, node numbering and validation errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from flwr_hpc.config import load_federation, node_id_for
from flwr_hpc.errors import ConfigError


def test_default_federation_has_three_sites_and_a_shared_site():
    fed = load_federation()
    assert fed.name == "local"
    assert len(fed.sites) >= 3
    assert max(s.clients for s in fed.sites) >= 2
    assert fed.source.endswith("conf/federation/local.yaml")


def test_partition_ids_and_node_ids():
    fed = load_federation()
    clients = fed.clients()
    n = fed.num_clients
    assert len(clients) == n == sum(s.clients for s in fed.sites)
    assert sorted(c.partition_id for c in clients) == list(range(n))
    assert [c.node_config["partition-id"] for c in clients] == list(range(n))
    assert {c.node_config["num-partitions"] for c in clients} == {n}
    ids = [c.node_id for c in clients]
    assert len(set(ids)) == n
    assert all(1 < i < 2**63 for i in ids)
    # stable across loads and derived from (federation, site, slot)
    assert ids == [c.node_id for c in load_federation().clients()]
    assert clients[0].node_id == node_id_for("local", clients[0].site, 0)


def test_overrides_change_clients_and_keep_numbering():
    fed = load_federation(["federation.sites.beta.clients=3",
                           "+federation.sites.alpha.node_config.flavour=x"])
    assert fed.site("beta").clients == 3
    clients = fed.clients()
    assert [c.partition_id for c in clients] == list(range(5))
    alpha = [c for c in clients if c.site == "alpha"][0]
    assert alpha.node_config == {"flavour": "x", "partition-id": 0, "num-partitions": 5}


def _write(dir_, name, text):
    (dir_ / "federation").mkdir(exist_ok=True)
    path = dir_ / "federation" / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ("""
         name: bad
         sites:
           a: {clients: 1, colour: blue}
         """, "sites.a.colour", "unknown key"),
        ("""
         name: bad
         sites:
           a: {clients: two}
         """, "sites.a.clients", "expected an integer"),
        ("""
         sites:
           a: {clients: 1}
         """, "name", "missing required key"),
        ("""
         name: bad
         sites:
           a: {compute: {type: cloud}}
         """, "sites.a.compute.type", "unsupported value 'cloud'"),
        ("""
         name: bad
         sites:
           a: {clients: 0}
         """, "sites.a.clients", "must be >= 1"),
        ("""
         name: bad
         sites: {}
         """, "sites", "non-empty"),
        ("""
         name: bad
         sites:
           a: {launcher: {type: none, ranks: 2}}
         """, "sites.a.launcher.ranks", "needs a launcher"),
        ("""
         name: bad
         sites:
           a: {launcher: {type: pbsdsh}}
         """, "sites.a.launcher.type", "unsupported value 'pbsdsh'"),
    ],
)
def test_malformed_federation_names_key_and_file(tmp_path, body, key, problem):
    path = _write(tmp_path, "bad", body)
    with pytest.raises(ConfigError) as info:
        load_federation(["federation=bad"], [tmp_path])
    err = info.value
    assert err.key == key
    assert problem in err.problem
    assert str(path) in str(err) or "federation/bad.yaml" in str(err)


def test_unknown_federation_lists_available(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_federation(["federation=nowhere"])
    listed = str(info.value).split("available federations: ")[1].rstrip(")").split(", ")
    assert {"local", "local_ranks", "doe4"} <= set(listed)


def test_up_refuses_malformed_federation(tmp_path, flwr_home):
    _write(tmp_path, "broken", """
        name: broken
        sites:
          a: {clients: 1, launcher: {type: none, ranks: many}}
        """)
    proc = subprocess.run(
        [sys.executable, "-m", "flwr_hpc.control.cli", "up", "--port", "39999",
         "--config-dir", str(tmp_path), "federation=broken"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "sites.a.launcher.ranks" in proc.stderr
    assert "federation/broken.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (flwr_home / "hpc" / "superlink.json").exists()


@pytest.mark.parametrize("item", ["dp=opacus", "strategy.num_rounds=2", "+foo=1",
                                  "train.local_steps=3"])
def test_a_job_key_given_as_a_federation_override_is_refused_saying_where_it_goes(item):
    """`flwr-hpc run . dp=opacus` composed the federation with dp=opacus and ignored it: a
    user believed they trained privately. Now it is refused."""
    with pytest.raises(ConfigError) as err:
        load_federation(["federation=local", item])
    key = item.lstrip("+").partition("=")[0]
    assert f"'{key}' is not a federation key" in str(err.value)
    assert f"-c 'overrides=\"{item}\"'" in str(err.value)
    fed = load_federation(["federation=local", "federation.sites.beta.clients=3",
                           "~federation.sites.gamma"])  # federation keys still work
    assert sorted(s.name for s in fed.sites) == ["alpha", "beta"] and fed.num_clients == 4


def test_names_paths_and_sizes_that_would_write_where_they_must_not_are_refused(tmp_path):
    from flwr_hpc.config import FederationConfig

    def fed(**extra):
        site = {"clients": 1, **extra.pop("site", {})}
        return FederationConfig.from_dict({"name": "f", "sites": {"a": site}, **extra},
                                          source="x.yaml")

    with pytest.raises(ConfigError, match=r"x.yaml: name: '\.\./\.\./escape' is not a plain"):
        fed(name="../../escape")
    with pytest.raises(ConfigError, match=r"sites.a.clients: must be <= 1024, got 100000"):
        fed(site={"clients": 100000})
    with pytest.raises(ConfigError, match=r"sites.a.payload.path: '/usr/lib/x' is a system"):
        fed(site={"payload": {"path": "/usr/lib/x"}})
    with pytest.raises(ConfigError, match=r"workdir: '/etc' is a system directory"):
        fed(workdir="/etc")
    assert fed(site={"payload": {"path": str(tmp_path / "store")}}).name == "f"
    assert fed(site={"clients": 1024}).num_clients == 1024
