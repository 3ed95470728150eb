"""Slide-level prediction with attention MIL: bags from embed_cohort, ABMIL vs mean pooling on a synthetic
cohort with planted labels (known answers), the patient-level protocol, attention, save / load."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import hopt_st as hs
from hopt_st.datasets._mil import planted_tiles
from hopt_st.io._bags import ArrayBags, Bags
from hopt_st.tl._mil_protocol import patient_folds, score, summarize

# small, fast settings (the protocol's defaults are larger grids); one torch thread: tiny matrices
FAST = {"hidden_dim": 32, "attention_dim": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("mil_cohort")
    labels = hs.datasets.synthetic_mil_cohort(root, n_slides=60, seed=0)
    return root, labels, hs.io.Bags.from_cohort(root, "synthetic", labels)


def _holdout(labels):
    """Even patients train, odd ones test: no patient on both sides."""
    pid = labels["patient"].str[-3:].astype(int).to_numpy()
    return np.flatnonzero(pid % 2 == 0), np.flatnonzero(pid % 2 == 1)


def _auc(model, bags, y, test):
    return score("binary", y[test], model.predict_proba(bags.subset(test)), model.classes_)


# ----------------------------------------------------------------------------------------------------- bags
@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory):
    """Two synthetic whole slides (TIFF, no spots) embedded through embed_cohort with the handcrafted encoder."""
    root = tmp_path_factory.mktemp("slides")
    for i in range(2):
        hs.datasets.synthetic_slide(800, 600, seed=i, n_genes=5, path=root / f"s{i}.tif")
    pd.DataFrame({"sample_id": ["a", "b"], "source": ["s0.tif", "s1.tif"], "patient": ["p", "q"]}).to_csv(
        root / "cohort.csv", index=False
    )
    status = hs.pp.embed_cohort(root / "cohort.csv", "handcrafted", root / "emb", progress=False)
    return root, status


def test_embed_cohort_tiles_whole_slides_into_bags(slide_cohort):
    root, status = slide_cohort
    assert list(status["status"]) == ["done", "done"]
    assert hs.io.read_cohort(root / "cohort.csv")["kind"].tolist() == ["slide", "slide"]
    bags = Bags.from_cohort(root / "emb", "handcrafted", pd.DataFrame({"sample_id": ["a", "b"]}))
    for i, n in enumerate(status["n_spots"]):
        bag = bags[i]
        assert bag.embeddings.shape == (n, 32) and n > 0
        assert all(b.startswith("grid_shapes_") for b in bag.barcodes)  # tile ids of the grid
        # HEST's layout: top-left corners 224 px apart at 0.5 µm/px (tiles of one 112 µm patch that touch)
        assert np.all(np.diff(np.unique(bag.coords[:, 0])) % 224 == 0)
        assert bag.provenance["model"] == "handcrafted" and bag.provenance["kind"] == "slide"


def test_bags_read_one_file_at_a_time_and_refuse_mixed_encoders(cohort, tmp_path):
    root, labels, bags = cohort
    assert not hasattr(bags, "_arrays")  # only paths are held
    sub = bags.subset([0, 1])
    # a copy of two bags, one of them rewritten as if embedded by another encoder
    for i, sid in enumerate(sub.sample_ids):
        bag = sub[i]
        prov = dict(bag.provenance, model="other" if i else bag.provenance["model"])
        hs.io.write_embeddings(tmp_path / f"{sid}.h5", bag.embeddings, bag.barcodes, provenance=prov)
    mixed = Bags([tmp_path / f"{s}.h5" for s in sub.sample_ids])
    assert mixed[0].embeddings.shape == bags[0].embeddings.shape
    (tmp_path / f"{sub.sample_ids[0]}.h5").unlink()  # bag 1 alone is read: bag 0's file is not needed
    with pytest.raises(ValueError, match="model: 'synthetic' vs 'other'"):
        mixed.arrays(1)
    with pytest.raises(FileNotFoundError, match="no embedding file"):
        Bags.from_cohort(root, "synthetic", pd.DataFrame({"sample_id": ["slide000", "nope"]}))


# ------------------------------------------------------------------------------------------ known answers
def _abmil_and_meanpool(bags, labels, target, steps):
    """The protocol (5 patient folds) on ``target`` for a small ABMIL (steps chosen among ``steps`` inside each
    training set) and mean pooling: the results and the mean score of each."""
    res = hs.tl.cross_validate_mil(
        bags,
        labels,
        target,
        mil=[hs.tl.ABMIL(**FAST), "meanpool"],
        lrs=(1e-3,),
        steps=steps,
        inner_splits=2,
        progress=False,
    )
    return res, summarize(res).set_index("mil")["score_mean"]


def test_abmil_finds_a_localised_patch_that_mean_pooling_misses(cohort):
    """The protocol (5 patient folds, steps chosen inside each training set) on the localised label."""
    root, labels, bags = cohort
    res, s = _abmil_and_meanpool(bags, labels, "localised", (100, 250))
    assert s["abmil"] >= 0.9, s
    assert s["meanpool"] <= 0.8, s  # well below
    assert set(res["fold"]) == set(range(5)) and (res["metric"] == "auc").all()


def test_attention_concentrates_on_the_planted_patch(cohort):
    root, labels, bags = cohort
    train, test = _holdout(labels)
    y = labels["localised"].to_numpy()
    model = hs.tl.ABMIL(lr=1e-3, steps=250, **FAST).fit(bags.subset(train), y[train])
    planted = planted_tiles(root)
    pos = [i for i in test if y[i] == 1]
    share = np.mean([model.attention(bags[i])[planted[bags.sample_ids[i]]].sum() for i in pos])
    area = np.mean([planted[bags.sample_ids[i]].mean() for i in pos])
    assert area <= 0.05
    assert share >= 0.5, (share, area)  # > 10x the patch's share of the tissue
    tab = hs.tl.attention_table(model, bags[pos[0]])
    assert list(tab.columns) == ["tile_id", "x", "y", "attention"]
    assert np.isclose(tab["attention"].sum(), 1.0)


def test_global_proportion_shift_both_do_well_and_permuted_labels_give_chance(cohort):
    root, labels, bags = cohort
    _, s = _abmil_and_meanpool(bags, labels, "global", (100, 200))
    assert s["abmil"] >= 0.85 and s["meanpool"] >= 0.85, s
    yp = np.random.default_rng(1).permutation(labels["localised"].to_numpy())
    perm = hs.tl.cross_validate_mil(
        bags, labels.assign(perm=yp), "perm", mil="meanpool", inner_splits=2, progress=False
    )
    assert abs(perm["score"].mean() - 0.5) <= 0.15
    train, test = _holdout(labels)
    abmil = hs.tl.ABMIL(lr=1e-3, steps=100, **FAST).fit(bags.subset(train), yp[train])
    assert abs(_auc(abmil, bags, yp, test) - 0.5) <= 0.2


def test_multiclass_and_bulk_expression_targets(cohort):
    root, labels, bags = cohort
    train, test = _holdout(labels)
    y = labels["subtype"].to_numpy()
    m = hs.tl.ABMIL(lr=1e-3, steps=250, **FAST).fit(bags.subset(train), y[train])
    proba = m.predict_proba(bags.subset(test))
    assert proba.shape == (len(test), 3) and np.allclose(proba.sum(1), 1)
    assert list(m.classes_) == ["A", "B", "C"] and set(m.predict(bags.subset(test))) <= {"A", "B", "C"}
    assert score("multiclass", y[test], proba, m.classes_) >= 0.65  # chance: 0.5; 30 training slides
    # bulk expression: one value per gene per slide, driven by the planted states
    rng = np.random.default_rng(0)
    genes = labels.assign(
        GENE_A=3.0 * labels["global"] + rng.normal(0, 0.5, len(labels)),
        GENE_B=2.0 * labels["localised"] + rng.normal(0, 0.5, len(labels)),
    )
    res = hs.tl.cross_validate_mil(
        bags, genes, ["GENE_A", "GENE_B"], mil="meanpool", inner_splits=2, progress=False
    )
    assert (res["metric"] == "pearson_mean").all() and len(res) == 5
    per_gene = res.attrs["per_gene"].groupby("gene")["pearson"].mean()
    assert per_gene["GENE_A"] >= 0.7  # the global shift is in the mean embedding
    reg = hs.tl.ABMIL(lr=1e-3, steps=250, **FAST).fit(
        bags.subset(train), genes[["GENE_A", "GENE_B"]].to_numpy()[train]
    )
    pred = reg.predict(bags.subset(test))
    assert pred.shape == (len(test), 2)
    r = hs.tl.pearson_per_gene(genes[["GENE_A", "GENE_B"]].to_numpy()[test], pred)
    # one attention per slide serves every gene: the global gene is learnt well, the patch gene less so
    assert r[0] >= 0.6 and r[1] >= 0.2, r


def test_deterministic_on_cpu_for_a_fixed_seed(cohort):
    root, labels, bags = cohort
    y = labels["localised"].to_numpy()
    sub = bags.subset(np.arange(20))
    a = hs.tl.ABMIL(lr=1e-3, steps=30, dropout=0.25, seed=3, **FAST).fit(sub, y[:20]).predict_proba(sub)
    torch.manual_seed(123)  # the caller's random state plays no part
    b = hs.tl.ABMIL(lr=1e-3, steps=30, dropout=0.25, seed=3, **FAST).fit(sub, y[:20]).predict_proba(sub)
    c = hs.tl.ABMIL(lr=1e-3, steps=30, dropout=0.25, seed=4, **FAST).fit(sub, y[:20]).predict_proba(sub)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------------------------- protocol
class _CountingBags(ArrayBags):
    """In-memory bags that count how often each slide's embeddings are read (shared by their subsets)."""

    def __init__(self, arrays, sample_ids, patients, provenance, reads):
        super().__init__(arrays, sample_ids, patients, provenance)
        self.reads = reads

    def arrays(self, i):
        self.reads[self.sample_ids[int(i)]] += 1
        return super().arrays(i)

    def subset(self, idx):
        sub = super().subset(idx)
        return _CountingBags(sub._arrays, sub.sample_ids, sub.patients, sub._provenance, self.reads)


def test_mean_pooling_cross_validation_reads_each_slide_once(cohort):
    """Every slide is read once for all outer folds and both mean-pooling models; the scores and predictions
    are those of fitting and scoring on the slides fold by fold (the committed behaviour)."""
    from collections import Counter

    from hopt_st.tl._mil_protocol import fit_mil, patient_folds

    root, labels, bags = cohort
    labels = labels.iloc[:24].reset_index(drop=True)
    reads = Counter()
    counting = _CountingBags(
        [bags.arrays(i) for i in range(24)], labels["sample_id"], labels["patient"], bags.provenance, reads
    )
    res = hs.tl.cross_validate_mil(
        counting,
        labels,
        "global",
        mil=["meanpool", hs.tl.MeanPoolMIL()],
        n_splits=3,
        inner_splits=2,
        progress=False,
    )
    assert len(res) == 6 and reads == Counter({s: 1 for s in labels["sample_id"]})
    y, groups = labels["global"].to_numpy(), labels["patient"].to_numpy().astype(str)
    ref = bags.subset(np.arange(24))
    for k, (train, test) in enumerate(patient_folds(y, groups, 3, 0, "binary")):
        est = fit_mil(ref.subset(train), y[train], groups[train], mil="meanpool", n_splits=2, task="binary")
        proba = est.predict_proba(ref.subset(test))
        assert res["score"][k] == score("binary", y[test], proba, est.classes_)
        got = res.attrs["predictions"].query("fold == @k and mil == 'meanpool'")
        assert np.array_equal(got[["p_0", "p_1"]].to_numpy(), proba)


def test_patient_folds_never_split_a_patient():
    y = np.tile([0, 1], 30)
    groups = np.repeat(np.arange(20), 3).astype(str)
    folds = patient_folds(y, groups, 5, 0, "binary")
    seen = np.zeros(len(y), int)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        seen[test] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError, match="3 patients cannot make 5 folds"):
        patient_folds(y[:9], groups[:9], 5, 0, "binary")


def test_fit_mil_chooses_steps_inside_the_training_data(cohort):
    root, labels, bags = cohort
    train, _ = _holdout(labels)
    y = labels["localised"].to_numpy()[train]
    m = hs.tl.fit_mil(bags.subset(train), y, mil=hs.tl.ABMIL(**FAST), lrs=(1e-3,), steps=(5, 200), n_splits=2)
    assert len(m.cv_results_) == 2  # one training run per fold scored both step counts
    assert m.best_params_ == {"lr": 1e-3, "steps": 200}  # 5 steps learn nothing
    assert m.steps == 200


# ------------------------------------------------------------------------------------- save, provenance
def test_save_load_roundtrip_refuses_overwrite_and_other_encoders(cohort, tmp_path):
    root, labels, bags = cohort
    y = labels["localised"].to_numpy()
    sub = bags.subset(np.arange(12))
    for model in (hs.tl.ABMIL(lr=1e-3, steps=20, **FAST), hs.tl.MeanPoolMIL()):
        model.fit(sub, y[:12])
        path = tmp_path / f"{type(model).__name__}.safetensors"
        model.save(path)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            model.save(path)
        back = hs.tl.load_mil(path)
        assert type(back) is type(model)
        assert np.allclose(back.predict_proba(sub), model.predict_proba(sub), atol=1e-6)
        assert back.provenance_ == {
            "model": "synthetic",
            "weights_sha256": "none",
            "mpp": 0.5,
            "patch_size": 224,
        }
        other = ArrayBags([sub.arrays(0)], provenance=dict(back.provenance_, model="uni"))
        with pytest.raises(ValueError, match="model: 'synthetic' \\(fit\\) vs 'uni'"):
            back.predict(other)
        wrong_dim = ArrayBags([np.zeros((4, 7), np.float32)])
        with pytest.raises(ValueError, match="7-dimensional"):
            back.predict(wrong_dim)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(hs.io.CorruptFileError):
        hs.tl.load_mil(tmp_path / "bad.safetensors")


def test_attention_is_written_to_the_slide_grid(slide_cohort, tmp_path):
    """ABMIL on bags from embed_cohort; its attention over one slide's grid (embedded in memory) equals the
    attention over that slide's bag, tile by tile."""
    root, _ = slide_cohort
    bags = Bags.from_cohort(root / "emb", "handcrafted", pd.DataFrame({"sample_id": ["a", "b"]}))
    model = hs.tl.ABMIL(lr=1e-3, steps=4, **FAST).fit(bags, np.array([0, 1]))
    sdata = hs.io.read_slide(root / "s0.tif")
    from hopt_st.pp._slide_tiles import slide_tiles

    slide_tiles(sdata, 224, 0.5)
    hs.pp.embed(sdata, "handcrafted", table_name="grid", progress=False)
    hs.tl.mil_attention(sdata, model)
    grid = sdata.tables["grid"]
    ref = hs.tl.attention_table(model, bags[0]).set_index("tile_id")["attention"]
    assert np.allclose(grid.obs["attention"].to_numpy(), ref.loc[grid.obs_names].to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="overwrite=True"):
        hs.tl.mil_attention(sdata, model)
    with h5py.File(bags.paths[0], "r") as f:
        assert f["embeddings"].shape[0] == grid.n_obs


def test_bag_provenance_is_compared_after_normalising_values_read_back():
    """An int patch size and the same value read back from a file (text, bytes, a numpy float, as HDF5 / JSON
    attributes give) compare equal, in the MIL check and the regressor's alike; another patch size is refused
    with both values named."""
    from hopt_st.tl._mil import check_bag_provenance
    from hopt_st.tl._provenance import provenance_differences

    fit = {"model": "uni", "weights_sha256": "abc", "mpp": 0.5, "patch_size": 224}
    for read_back in ("224", b"224", np.float64(224.0), np.array(224), "224.0"):
        found = dict(fit, patch_size=read_back, mpp="0.5", model=b"uni")
        assert provenance_differences(fit, found) == [], read_back
        check_bag_provenance(fit, ArrayBags([np.zeros((2, 3), np.float32)], provenance=found))
    other = ArrayBags([np.zeros((2, 3), np.float32)], provenance=dict(fit, patch_size="256"))
    with pytest.raises(ValueError, match=r"patch_size: 224 \(fit\) vs '256' \(given\)"):
        check_bag_provenance(fit, other)
    assert provenance_differences(fit, {"patch_size": 224.5}) == ["patch_size: 224 (fit) vs 224.5 (given)"]
    assert provenance_differences(fit, {"mpp": 0.5004}) == []  # within 1e-3
    assert provenance_differences(fit, {"mpp": 0.51}) == ["mpp: 0.5 (fit) vs 0.51 (given)"]


@pytest.mark.parametrize("kind", ["abmil", "abmil-regression", "meanpool"])
def test_predict_mil_scores_a_slide_in_one_pass(slide_cohort, tmp_path, monkeypatch, kind):
    """``predict --mil`` runs the model over the slide's tiles once, and writes what predict_proba / predict
    and attention give on the embeddings it stored (the committed behaviour, which ran them one after the
    other)."""
    import spatialdata as sd

    from hopt_st._mil_run import run_predict_mil

    root, _ = slide_cohort
    bags = Bags.from_cohort(root / "emb", "handcrafted", pd.DataFrame({"sample_id": ["a", "b"]}))
    y = np.array([[0.5, -1.0], [2.0, 3.0]]) if kind == "abmil-regression" else np.array(["no", "yes"])
    est = hs.tl.MeanPoolMIL() if kind == "meanpool" else hs.tl.ABMIL(lr=1e-3, steps=4, **FAST)
    est.fit(bags, y).save(tmp_path / "m.safetensors")
    calls = []
    forward = hs.tl.ABMIL._forward
    monkeypatch.setattr(hs.tl.ABMIL, "_forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    out = tmp_path / "s0.zarr"
    res = run_predict_mil(
        root / "s0.tif", tmp_path / "m.safetensors", model="handcrafted", out=out, progress=False
    )
    grid = sd.read_zarr(out).tables["grid"]
    assert calls == ([] if kind == "meanpool" else [grid.n_obs])  # one forward, over every tile
    monkeypatch.setattr(hs.tl.ABMIL, "_forward", forward)
    back = hs.tl.load_mil(tmp_path / "m.safetensors")
    bag = ArrayBags([np.asarray(grid.obsm["X_handcrafted"])], provenance=bags.provenance)
    pred = res["prediction"]
    if kind == "abmil-regression":
        assert pred["prediction"] == back.predict(bag)[0].tolist() and len(pred["prediction"]) == 2
    else:
        proba = back.predict_proba(bag)[0]
        assert pred["probabilities"] == {"no": float(proba[0]), "yes": float(proba[1])}
        assert pred["prediction"] == back.classes_[np.argmax(proba)]
    assert np.array_equal(grid.uns["hopt_st"]["mil"]["prediction"], pred["prediction"])
    if kind == "meanpool":
        assert "attention" not in grid.obs and not (tmp_path / "s0_attention.png").exists()
    else:
        assert np.array_equal(grid.obs["attention"].to_numpy(), back.attention(bag.arrays(0)))
        assert grid.uns["hopt_st"]["attention"]["attention"]["use_rep"] == "X_handcrafted"
        assert (tmp_path / "s0_attention.png").is_file()


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.mark.usefixtures("cli_process_state")
def test_cli_mil_cross_validates_and_predict_scores_one_slide(slide_cohort, tmp_path, capsys):
    from hopt_st._cli import main

    root, _ = slide_cohort
    # four more bags of the same two slides' embeddings under other names: a cohort of 6 slides, 3 patients
    for k in range(4):
        src = hs.io.read_embeddings(root / "emb" / "handcrafted" / f"{'ab'[k % 2]}.h5")
        hs.io.write_embeddings(
            tmp_path / "emb" / "handcrafted" / f"x{k}.h5",
            src.embeddings,
            src.barcodes,
            coords=src.coords,
            provenance=src.provenance,
        )
    for s in "ab":
        (tmp_path / "emb" / "handcrafted" / f"{s}.h5").write_bytes(
            (root / "emb" / "handcrafted" / f"{s}.h5").read_bytes()
        )
    labels = pd.DataFrame(
        {
            "sample_id": ["a", "b", "x0", "x1", "x2", "x3"],
            "patient": list("ppqqrr"),
            "MSI": [0, 1, 0, 1, 0, 1],
        }
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = [
        "-q",
        "mil",
        "--labels",
        tmp_path / "labels.csv",
        "--target",
        "MSI",
        "--model",
        "handcrafted",
        "--embeddings",
        tmp_path / "emb",
        "--folds",
        "3",
        "--inner-folds",
        "2",
        "--lrs",
        "1e-3",
        "--steps",
        "2,4",
        "--out",
        tmp_path / "out",
    ]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "abmil" in out and "meanpool" in out
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(res.columns) == hs.tl._mil_protocol.MIL_RESULT_COLUMNS
    assert len(res) == 6 and set(res["metric"]) == {"auc"}
    att = pd.read_csv(tmp_path / "out" / "attention" / "a.csv")
    assert np.isclose(att["attention"].sum(), 1.0) and len(att) == len(
        hs.io.read_embeddings(root / "emb" / "handcrafted" / "a.h5")
    )
    assert main([str(a) for a in args]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err

    # one slide scored with the saved ABMIL; a model of other embeddings is refused before any tile is cut
    def predict(model, out, *more):
        mil = str(tmp_path / "out" / "abmil.safetensors")
        return main(
            ["-q", "predict", str(root / "s0.tif"), "--mil", mil, "--model", model, *more, "--out", str(out)]
        )

    zarr = tmp_path / "s0_mil.zarr"
    assert predict("handcrafted", zarr) == 0
    assert "P(1)=" in capsys.readouterr().out
    import spatialdata as sd

    grid = sd.read_zarr(zarr).tables["grid"]
    assert np.allclose(
        grid.obs["attention"].to_numpy(),
        att.set_index("tile_id").loc[grid.obs_names, "attention"].to_numpy(),
        atol=1e-5,
    )
    assert (tmp_path / "s0_mil_attention.png").is_file()
    assert predict("h-optimus-1", tmp_path / "other.zarr") == 1
    assert "fitted on 'handcrafted' embeddings" in capsys.readouterr().err
    # --overwrite replaces the store it wrote (marked as ours), never the slide it reads (rule 1)
    slide_bytes = (root / "s0.tif").read_bytes()
    assert predict("handcrafted", root / "s0.tif", "--overwrite") == 1
    assert "never replaces an input" in capsys.readouterr().err
    assert (root / "s0.tif").read_bytes() == slide_bytes
    assert predict("handcrafted", zarr, "--overwrite") == 0 and (zarr / ".hopt_st_output").is_file()
