"""nflux.data: toy samplers and densities, the registry and splits, scikit-learn sets offline,
users' files and image folders, the UCI loaders on tiny fake files, and the Standardizer."""

from __future__ import annotations

import json
import math
import socket
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from nflux import data
from nflux.data import toys
from nflux.data.errors import DatasetError, DatasetNotFoundError, MissingDependencyError

TOY_NAMES = list(toys.TOYS)


# --- toys ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sampler_deterministic_shape_scale(name):
    sample = toys.TOYS[name][0]
    a = sample(4000, torch.Generator().manual_seed(1))
    b = sample(4000, torch.Generator().manual_seed(1))
    c = sample(4000, torch.Generator().manual_seed(2))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    assert a.abs().max() < 6.0
    std = a.std(0)
    assert (std > 0.8).all() and (std < 3.0).all(), std
    assert a.mean(0).abs().max() < 0.6
    assert sample(0, torch.Generator()).shape == (0, 2)
    assert sample(5, torch.Generator().manual_seed(0), dtype=torch.float64).dtype == torch.float64


def test_toy_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        toys.moons(-1)
    with pytest.raises(ValueError, match="shape \\[n, 2\\]"):
        toys.eight_gaussians_log_prob(torch.zeros(3, 3))


def _grid(lo, hi, step):
    c = torch.arange(lo + step / 2, hi, step, dtype=torch.float64)  # cell midpoints
    xx, yy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


@pytest.mark.parametrize("name", ["eight_gaussians", "checkerboard"])
def test_toy_density_normalised_and_matches_sampler(name):
    sample, log_prob, _ = toys.TOYS[name]
    step = 0.02
    x = _grid(-7.0, 7.0, step)
    lp = log_prob(x)
    p = lp.exp()
    assert abs(p.sum().item() * step**2 - 1.0) < 1e-4
    # E_p[log p] by quadrature equals the Monte Carlo mean of log p over the sampler's draws.
    neg_entropy = (p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum().item() * step**2
    s = sample(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    lps = log_prob(s)
    assert torch.isfinite(lps).all()
    se = lps.std().item() / math.sqrt(len(lps)) + 1e-9
    assert abs(lps.mean().item() - neg_entropy) < 5 * se + 1e-6


def test_checkerboard_density_zero_off_board():
    lp = toys.checkerboard_log_prob(torch.tensor([[0.5, 2.5], [5.0, 0.5], [0.5, 0.5], [-0.5, 0.5]]))
    assert torch.isinf(lp[0]) and torch.isinf(lp[1]) and torch.isinf(lp[3])
    assert lp[2].item() == pytest.approx(-math.log(32))


# --- registry and splits ---------------------------------------------------------------


def test_available_lists_everything():
    names = data.available()
    for n in TOY_NAMES + ["digits", "iris", "wine", "breast_cancer", "diabetes",
                          "power", "gas", "hepmass", "miniboone", "bsds300"]:
        assert n in names and isinstance(names[n], str) and names[n]


@pytest.mark.parametrize("name", ["moons", "checkerboard"])
def test_toy_splits_sizes_and_determinism(name):
    a = data.load(name, seed=3)
    b = data.load(name.upper(), seed=3)
    c = data.load(name, seed=4)
    assert a.kind == "toy" and a.shape == (2,)
    for split, n in data.TOY_SIZES.items():
        assert getattr(a, split).shape == (n, 2)
        assert torch.equal(getattr(a, split), getattr(b, split))
        assert not torch.equal(getattr(a, split), getattr(c, split))
    assert not torch.equal(a.train[:100], a.test[:100])
    json.dumps(a.meta)


def test_unknown_name_suggests():
    with pytest.raises(DatasetError, match="Did you mean moons"):
        data.load("moon")
    with pytest.raises(DatasetError, match="seed"):
        data.load("moons", seed=-1)


def _offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_offline(monkeypatch):
    _offline(monkeypatch)
    a = data.load("digits", seed=0)
    b = data.load("digits", seed=0)
    assert a.kind == "image" and a.shape == (1, 8, 8) and a.meta["levels"] == 17
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.val) == len(a.test) == 180
    allx = torch.cat([a.train, a.val, a.test])
    assert allx.min() == 0 and allx.max() == 16 and torch.equal(allx, allx.round())
    assert torch.equal(a.train, b.train)
    from sklearn.datasets import load_digits

    assert allx.sum().item() == pytest.approx(float(load_digits().images.sum()))


@pytest.mark.parametrize(
    "name,n,d", [("iris", 150, 4), ("wine", 178, 13), ("breast_cancer", 569, 30), ("diabetes", 442, 10)]
)
def test_sklearn_tabular_offline(monkeypatch, name, n, d):
    _offline(monkeypatch)
    s = data.load(name)
    assert s.kind == "tabular" and s.shape == (d,)
    assert len(s.train) + len(s.val) + len(s.test) == n
    assert s.meta["sizes"]["test"] == round(0.1 * n)


def test_sklearn_missing_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingDependencyError, match="pip install scikit-learn"):
        data.load("iris")


# --- users' files ----------------------------------------------------------------------


def _rows(t):
    return sorted(map(tuple, t.tolist()))


def test_user_npy_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "mine.npy", x)
    s = data.load(str(tmp_path / "mine.npy"), seed=1, dtype=torch.float64)
    assert s.kind == "tabular" and s.shape == (3,) and s.meta["name"] == "mine.npy"
    assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 5)
    assert _rows(torch.cat([s.train, s.val, s.test])) == _rows(torch.from_numpy(x))
    assert torch.equal(s.train, data.load(tmp_path / "mine.npy", seed=1, dtype=torch.float64).train)


def test_user_npy_images(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(10, 6, 5, 3), dtype=np.uint8)  # NHWC
    np.save(tmp_path / "imgs.npy", imgs)
    s = data.load(str(tmp_path / "imgs.npy"))
    assert s.kind == "image" and s.shape == (3, 6, 5) and s.meta["levels"] == 256
    np.save(tmp_path / "grey.npy", imgs[..., 0])
    assert data.load(str(tmp_path / "grey.npy")).shape == (1, 6, 5)


@pytest.mark.parametrize("header,sep", [(True, ","), (False, ","), (False, " ")])
def test_user_csv_round_trip(tmp_path, header, sep):
    x = np.round(np.random.default_rng(1).normal(size=(20, 4)), 6)
    lines = ([sep.join(f"c{i}" for i in range(4))] if header else []) + [sep.join(map(repr, r)) for r in x.tolist()]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    s = data.load(str(tmp_path / "t.csv"), dtype=torch.float64)
    assert s.kind == "tabular" and s.shape == (4,)
    assert _rows(torch.cat([s.train, s.val, s.test])) == _rows(torch.from_numpy(x))


def test_user_file_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nope.npy") as e:
        data.load(str(tmp_path / "nope.npy"))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DatasetError, match="numeric"):
        data.load(str(tmp_path / "obj.npy"))
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n4,5\n")
    with pytest.raises(DatasetError, match="NaN or infinite"):
        data.load(str(tmp_path / "nan.csv"))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(DatasetError, match="cannot parse"):
        data.load(str(tmp_path / "bad.csv"))
    (tmp_path / "x.txt").write_text("1\n")
    with pytest.raises(DatasetError, match="unsupported file type"):
        data.load(str(tmp_path / "x.txt"))
    np.save(tmp_path / "two.npy", np.zeros((2, 3)))
    with pytest.raises(DatasetError, match="at least 3"):
        data.load(str(tmp_path / "two.npy"))


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(7, 5), dtype=np.uint8), "L").save(tmp_path / cls / f"{i}.png")
    s = data.load(str(tmp_path))
    assert s.kind == "image" and s.shape == (1, 7, 5) and s.meta["levels"] == 256
    assert len(s.train) + len(s.val) + len(s.test) == 6
    Image.fromarray(rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8), "RGB").save(tmp_path / "a" / "c.jpg")
    assert data.load(str(tmp_path)).shape == (3, 7, 5)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(tmp_path / "b" / "small.png")
    with pytest.raises(DatasetError, match="same size"):
        data.load(str(tmp_path))


def test_image_folder_16_bit_greyscale_keeps_its_depth(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65536, size=(5, 6, 4), dtype=np.uint16)
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")  # a 16-bit greyscale PNG
    s = data.load(str(tmp_path))
    assert s.shape == (1, 6, 4) and s.meta["levels"] == 65536
    # Every value as saved (convert("L") clipped them all to 255: near-white images).
    assert _rows(torch.cat([s.train, s.val, s.test]).flatten(1)) == _rows(torch.from_numpy(images.reshape(5, -1)))
    Image.fromarray(rng.integers(0, 256, size=(6, 4), dtype=np.uint8), "L").save(tmp_path / "eight.png")
    with pytest.raises(DatasetError, match="one bit depth"):
        data.load(str(tmp_path))


def test_image_folder_greyscale_with_alpha_is_one_channel(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    grey = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    for i, g in enumerate(grey):
        Image.fromarray(np.stack([g, np.full_like(g, 7)], -1), "LA").save(tmp_path / f"{i}.png")
    s = data.load(str(tmp_path))
    assert s.shape == (1, 5, 4) and s.meta["levels"] == 256  # the alpha dropped, as for RGBA
    assert _rows(torch.cat([s.train, s.val, s.test]).flatten(1)) == _rows(torch.from_numpy(grey.reshape(3, -1)))


def test_user_csv_header_after_blank_lines(tmp_path):
    (tmp_path / "b.csv").write_text("\n  \na,b\n1,2\n3,4\n\n5,6\n")
    s = data.load(str(tmp_path / "b.csv"), dtype=torch.float64)
    assert _rows(torch.cat([s.train, s.val, s.test])) == [(1, 2), (3, 4), (5, 6)]


def test_user_npy_dtypes(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((5, 2)) + 1j)
    with pytest.raises(DatasetError, match="complex"):
        data.load(str(tmp_path / "c.npy"))
    rng = np.random.default_rng(0)
    for dtype, high, levels in [(np.int64, 256, 256), (np.uint16, 65536, 65536), (np.bool_, 2, 2),
                                (np.int64, 300, None), (np.float32, 256, None)]:
        np.save(tmp_path / "i.npy", rng.integers(0, high, size=(6, 1, 4, 4)).astype(dtype))
        assert data.load(str(tmp_path / "i.npy")).meta.get("levels") == levels, (dtype, high)
    # Integers that are not levels say so when a run needs levels (they were called float images).
    from nflux.training.task import make_task

    np.save(tmp_path / "i16.npy", rng.integers(-5, 1000, size=(6, 1, 4, 4)).astype(np.int16))
    with pytest.raises(ValueError, match=r"holds integers -?\d+\.\.\d+, outside 0\.\.255"):
        make_task(data.load(str(tmp_path / "i16.npy")), torch.device("cpu"), 0)


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependencyError, match="pip install pillow"):
        data.load(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .png"):
        data.load(str(empty))


# --- UCI benchmarks on tiny fake files -------------------------------------------------


def _maf_power_reference(raw):
    """A transcription of gpapamak/maf datasets/power.py (load_data_normalised)."""
    rng = np.random.RandomState(42)
    d = raw.copy()
    rng.shuffle(d)
    n = d.shape[0]
    d = np.delete(d, 3, axis=1)
    d = np.delete(d, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    d = d + np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((n, 1))))
    n_test = int(0.1 * d.shape[0])
    test, d = d[-n_test:], d[0:-n_test]
    n_val = int(0.1 * d.shape[0])
    val, train = d[-n_val:], d[0:-n_val]
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def test_uci_power_matches_reference(tmp_path):
    raw = np.random.default_rng(0).normal(size=(200, 8)) * 3 + 1
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    s = data.load("power", root=tmp_path, dtype=torch.float64)
    ref = _maf_power_reference(raw)
    assert s.kind == "tabular" and s.shape == (6,)
    assert (len(s.train), len(s.val), len(s.test)) == (162, 18, 20)
    for got, want in zip((s.train, s.val, s.test), ref):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_uci_miniboone(tmp_path):
    raw = np.random.default_rng(1).normal(size=(100, 5)) * 2 + 3
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    s = data.load("miniboone", root=str(tmp_path), dtype=torch.float64)
    assert (len(s.train), len(s.val), len(s.test)) == (81, 9, 10)
    np.testing.assert_allclose(s.test.numpy(), (raw[90:] - raw[:90].mean(0)) / raw[:90].std(0), atol=1e-12)


def test_uci_gas_drops_correlated_columns(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(120, 8))
    raw = np.hstack([base, base + 1e-3 * rng.normal(size=base.shape)])  # 16 "sensors"
    (tmp_path / "gas").mkdir()
    np.save(tmp_path / "gas" / "ethylene_CO.npy", raw)
    s = data.load("gas", root=tmp_path, dtype=torch.float64)
    assert s.shape == (8,)
    assert (len(s.train), len(s.val), len(s.test)) == (98, 10, 12)
    allx = torch.cat([s.train, s.val, s.test])
    torch.testing.assert_close(allx.std(0), torch.ones(8, dtype=torch.float64))


def test_uci_gas_pickle_needs_pandas_or_npy(tmp_path, monkeypatch):
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError, match="ethylene_CO.npy"):
        data.load("gas", root=tmp_path)


def test_uci_hepmass(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "hepmass").mkdir()
    header = "# label,f0,f1,f2,mass"

    def rows(n, extra):
        label = rng.integers(0, 2, size=(n, 1)).astype(float)
        feats = rng.normal(size=(n, 3))
        mass = rng.choice([500.0, 750.0, 1000.0], size=(n, 1))  # discrete: its min recurs
        cols = [label, feats, mass] + ([rng.normal(size=(n, 1))] if extra else [])
        return np.hstack(cols)

    train, test = rows(200, False), rows(60, True)
    for name, arr, head in (("1000_train.csv", train, header), ("1000_test.csv", test, header + ",extra")):
        np.savetxt(tmp_path / "hepmass" / name, arr, delimiter=",", header=head, comments="")
    s = data.load("hepmass", root=tmp_path, dtype=torch.float64)
    pos_train, pos_test = train[train[:, 0] == 1][:, 1:4], test[test[:, 0] == 1][:, 1:4]
    assert s.shape == (3,)  # mass dropped
    n_val = int(0.1 * len(pos_train))
    assert (len(s.train), len(s.val), len(s.test)) == (len(pos_train) - n_val, n_val, len(pos_test))
    mu, sd = pos_train.mean(0), pos_train.std(0, ddof=1)
    np.testing.assert_allclose(s.test.numpy(), (pos_test - mu) / sd, atol=1e-12)


def test_uci_bsds300_npy_fallback(tmp_path):
    (tmp_path / "BSDS300").mkdir()
    for k, n in (("train", 30), ("validation", 5), ("test", 7)):
        np.save(tmp_path / "BSDS300" / f"{k}.npy", np.random.default_rng(n).normal(size=(n, 63)))
    s = data.load("bsds300", root=tmp_path)
    assert s.shape == (63,) and (len(s.train), len(s.val), len(s.test)) == (30, 5, 7)


@pytest.mark.parametrize("name,expected", [
    ("power", "power/data.npy"), ("gas", "gas/ethylene_CO.pickle"), ("hepmass", "hepmass/1000_train.csv"),
    ("miniboone", "miniboone/data.npy"), ("bsds300", "BSDS300/BSDS300.hdf5"),
])
def test_uci_absent_is_clear(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError, match=expected.replace(".", "\\.")):
        data.load(name, root=tmp_path)
    with pytest.raises(DatasetError, match="root"):
        data.load(name)


# --- Standardizer ----------------------------------------------------------------------


def test_standardizer_round_trip_json_and_logdet():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2.0, 10.0, 1e-3]) + 7
    st = data.Standardizer.fit(x)
    z = st.forward(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(st.inverse(z), x)
    back = data.Standardizer.from_json(json.dumps(st.to_json()))
    assert torch.equal(back.mean, st.mean) and torch.equal(back.std, st.std)
    assert torch.equal(back.forward(x.float()), st.forward(x.float()))
    jac = torch.autograd.functional.jacobian(lambda v: st.forward(v[None])[0], x[0])
    assert st.logabsdet() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-12)


def test_standardizer_gives_exact_data_unit_density():
    mu, sd = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    st = data.Standardizer(mu, sd)
    x = torch.randn(10, 3, dtype=torch.float64) * sd + mu
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(st.forward(x)).sum(-1)
    torch.testing.assert_close(log_pz + st.logabsdet(), torch.distributions.Normal(mu, sd).log_prob(x).sum(-1))


def test_standardizer_floor_and_errors():
    x = torch.cat([torch.randn(20, 1), torch.full((20, 1), 3.0)], 1)
    st = data.Standardizer.fit(x, min_std=1e-3)
    assert st.std[1].item() == 1e-3 and torch.isfinite(st.forward(x)).all()
    with pytest.raises(ValueError, match="shape"):
        st.forward(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        data.Standardizer.fit(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match="Standardizer record"):
        data.Standardizer.from_json({"mean": [0.0]})


# --- optional readers (run where pandas / h5py are installed) ---------------------------


def test_uci_gas_pickle_with_pandas_matches_reference(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(5)
    base = rng.normal(size=(150, 8))
    sensors = np.hstack([base, base[:, :4] * 2 + 1e-3 * rng.normal(size=(150, 4)), rng.normal(size=(150, 4))])
    frame = pd.DataFrame(sensors, columns=[f"S{i}" for i in range(16)])
    frame.insert(0, "Eth", 1.0)
    frame.insert(0, "Meth", 2.0)
    frame.insert(0, "Time", np.arange(150.0))
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    s = data.load("gas", root=tmp_path, dtype=torch.float64)

    # A transcription of gpapamak/maf datasets/gas.py.
    ref = frame.drop(columns=["Meth", "Eth", "Time"])
    b = (ref.corr() > 0.98).values.sum(axis=1)
    while np.any(b > 1):
        ref = ref.drop(columns=ref.columns[np.where(b > 1)[0][0]])
        b = (ref.corr() > 0.98).values.sum(axis=1)
    ref = ((ref - ref.mean()) / ref.std()).values
    assert s.shape == (ref.shape[1],) == (12,)
    np.testing.assert_allclose(torch.cat([s.train, s.val, s.test]).numpy(), ref, atol=1e-12)


def test_uci_hepmass_matches_pandas_reference(tmp_path):
    pd = pytest.importorskip("pandas")
    test_uci_hepmass(tmp_path)  # writes the fake files
    path = tmp_path / "hepmass"
    # A transcription of gpapamak/maf datasets/hepmass.py.
    tr = pd.read_csv(path / "1000_train.csv", index_col=False)
    te = pd.read_csv(path / "1000_test.csv", index_col=False)
    tr = tr[tr[tr.columns[0]] == 1].drop(columns=tr.columns[0])
    te = te[te[te.columns[0]] == 1].drop(columns=te.columns[0])
    te = te.drop(columns=te.columns[-1])
    mu, sd = tr.mean(), tr.std()
    tr, te = ((tr - mu) / sd).values, ((te - mu) / sd).values
    drop = [j for j, col in enumerate(tr.T) if min(Counter(col).items())[1] > 5]
    keep = [j for j in range(tr.shape[1]) if j not in drop]
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(0.1 * tr.shape[0])
    s = data.load("hepmass", root=tmp_path, dtype=torch.float64)
    for got, want in zip((s.train, s.val, s.test), (tr[:-n_val], tr[-n_val:], te)):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_uci_bsds300_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "BSDS300").mkdir()
    sizes = (("train", 20), ("validation", 4), ("test", 6))
    arrays = {k: np.random.default_rng(n).normal(size=(n, 63)) for k, n in sizes}
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, a in arrays.items():
            f[k] = a
    s = data.load("bsds300", root=tmp_path, dtype=torch.float64)
    for got, k in zip((s.train, s.val, s.test), arrays):
        np.testing.assert_array_equal(got.numpy(), arrays[k])
