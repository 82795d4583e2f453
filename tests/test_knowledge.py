"""synehr.knowledge: code -> concept mapping, graph building and padding, RGCN gradients, PrimeKG loader,
link prediction against baselines on the demo graph, sibling distances, checkpoint resume, outputs."""
from pathlib import Path

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import polars as pl
import pytest
from flax import nnx

import synehr.knowledge as K
from synehr.core import make_key

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def src():
    return K.Sources()


@pytest.fixture(scope="module")
def demo(src):
    "The demo cohort's real vocabulary and its graph (with siblings, as the stage builds it)."
    from synehr.cohort import fit_lab_stats
    from synehr.demo import simulate_cohort
    from synehr.tokenizer import fit_vocab
    events = simulate_cohort(300, seed=0)
    vocab = fit_vocab(events, fit_lab_stats(events)).table
    kg = K.build_graph(vocab["code"].drop_nulls().unique().sort().to_list(), src, siblings=True)
    return vocab, kg


@pytest.fixture(scope="module")
def trained(demo):
    vocab, kg = demo
    return K.train_rgcn(kg, K.RGCNConfig.for_graph(kg, D=32, B=4, K=8, steps=120, eval_every=40), seed=0)


# ---------------------------------------------------------------- mapping
def test_closest_code_prefers_exact_then_ancestor_then_sibling():
    known = sorted(["E11", "E119", "E1165", "E1122", "N183", "N1831", "I10"])
    assert K.closest_code("E1165", known) == "E1165"
    assert K.closest_code("E1199", known) == "E119"          # ancestor by truncation
    assert K.closest_code("N1839", known, 3) == "N183"       # ancestor beats the longer-matching sibling
    assert K.closest_code("E1129", known, 3) == "E1122"      # no ancestor of length 4: the closest sibling
    assert K.closest_code("K35", known, 3) is None           # under the minimum shared prefix
    assert K.closest_code("E1", known, 3) is None
    assert K.closest_code("", [], 1) is None


def test_split_code_normalizes_coded_vocabularies_only():
    assert K.split_code(" icd10cm/e11.9 ") == ("ICD10CM", "E119")
    assert K.split_code("ATC/a10ba02") == ("ATC", "A10BA02")
    assert K.split_code("ADMISSION/EW EMER.") == ("ADMISSION", "EW EMER.")   # visit types stay verbatim
    assert K.split_code("MEDS_DEATH") == ("MEDS_DEATH", "")


def test_resolve_concept(src):
    assert K.resolve_concept("ICD10CM/E11.9", src) == ("ICD10CM/E119", "exact")
    assert K.resolve_concept("ICD10CM/E1199", src) == ("ICD10CM/E119", "prefix")
    assert K.resolve_concept("ICD10CM/Q", src) == (None, "unmapped")
    assert K.resolve_concept("ICD10PCS/0DTJ4ZZ", src) == ("ICD10PCS/0DTJ4ZZ", "exact")
    assert K.resolve_concept("ICD10PCS/5A1955Z", src) == ("ICD10PCS/5A1955Z", "exact")  # section 5: structural
    assert K.resolve_concept("LAB/50912", src) == ("LAB/50912", "exact")
    assert K.resolve_concept("LAB/1", src) == (None, "unmapped")
    assert K.resolve_concept("RACE/WHITE", src) == ("RACE/WHITE", "exact")


def test_deprecated_atc_codes_are_corrected(src):
    assert K.resolve_concept("ATC/L01XC02", src) == ("ATC/L01FA01", "corrected")   # rituximab, 2022
    assert K.resolve_concept("ATC/A10BX07", src) == ("ATC/A10BJ02", "corrected")   # liraglutide, 2017
    assert K.resolve_concept("ATC/A10BA02", src) == ("ATC/A10BA02", "exact")
    assert K.resolve_concept("ATC/A10BA0", src) == ("ATC/A10BA", "prefix")         # malformed: its level-4 group


def test_atc_corrections_table_is_well_formed(src):
    df = pl.read_csv(K.DATA_DIR / "atc_deprecated.csv", infer_schema=False)
    assert df["old_code"].is_unique().all()
    for old, new in zip(df["old_code"], df["new_code"]):
        assert K.atc_level(old) == 5 and K.atc_level(new) == 5 and old != new, (old, new)
    assert set(src.atc_corrections.values()).isdisjoint(src.atc_corrections)   # chains resolved, no cycles


def test_map_codes_and_coverage(src):
    kg = K.build_graph(["ICD10CM/E119", "ICD10CM/E1122", "ATC/A10BJ02", "LAB/50912", "SEX/F"], src)
    m = K.map_codes([None, "ICD10CM/E11.9", "ICD10CM/E1129", "ATC/A10BX07", "ICD10CM/K359", "LAB/50912", "SEX/F"], kg, src)
    assert m["match"].to_list() == ["special", "exact", "prefix", "corrected", "unmapped", "exact", "exact"]
    assert m["concept"][2] == "ICD10CM/E112" and m["concept"][3] == "ATC/A10BJ02"
    cov = K.coverage_table(m).filter(category="ICD10CM").row(0, named=True)
    assert (cov["tokens"], cov["exact"], cov["prefix"], cov["unmapped"]) == (3, 1, 1, 1)
    assert cov["coverage"] == pytest.approx(2 / 3)


def test_lab_items_file_errors_name_file_and_column(tmp_path):
    for f in ("atc.csv", "atc_deprecated.csv", "clinical_rules.csv"):
        (tmp_path / f).write_bytes((K.DATA_DIR / f).read_bytes())
    (tmp_path / "mimic_lab_items.csv").write_text("itemid,label,fluid\n50912,Creatinine,Blood\n")
    with pytest.raises(K.KnowledgeError, match=r"mimic_lab_items.csv: missing column\(s\) \['category'\]"):
        K.Sources(tmp_path).labs
    (tmp_path / "mimic_lab_items.csv").write_text("itemid,label,fluid,category\n50912,Creatinine,Blood,Chemistry\nx1,A,B,C\n")
    with pytest.raises(K.KnowledgeError, match="column 'itemid' must be an integer"):
        K.Sources(tmp_path).labs


# ---------------------------------------------------------------- graph
def test_graph_has_hierarchies_and_cross_type_edges(demo):
    _, kg = demo
    et = kg.edge_table()
    has = lambda s, r, d: len(et.filter(src_name=s, relation_name=r, dst_name=d)) == 1
    assert has("ICD10CM/E1122", "icd10cm_is_a", "ICD10CM/E112") and has("ICD10CM/E11", "icd10cm_is_a", "ICD10CM/E08-E13")
    assert has("ICD10CM/E08-E13", "icd10cm_is_a", "ICD10CM/CH04")
    assert has("ATC/A10BA02", "atc_is_a", "ATC/A10BA") and has("ATC/A10", "atc_is_a", "ATC/A")
    assert has("ICD10PCS/0DTJ4ZZ", "icd10pcs_is_a", "ICD10PCS/0DT") and has("ICD10PCS/0D", "icd10pcs_is_a", "ICD10PCS/0")
    assert has("LAB/50912", "lab_is_a", "LAB/Blood/Chemistry")
    assert has("ATC/A10BA02", "contraindicated_in", "LAB/50920<30") and has("LAB/50920<30", "state_of", "LAB/50920")
    assert has("ICD10CM/N184", "has_marker", "LAB/50920<30")
    assert has("ICD10CM/E1122", "icd10cm_use_additional", "ICD10CM/N18")
    assert has("ICD10CM/O80", "restricted_to_sex", "SEX/F")
    # every edge's relation is named, ids are 0..n-1, no self loops, no duplicates
    assert kg.nodes["node"].to_list() == list(range(kg.n_node))
    assert (kg.edges["src"] != kg.edges["dst"]).all()
    assert kg.edges.select("src", "dst", "relation").is_unique().all()
    assert et["relation_name"].null_count() == 0


def test_graph_is_deterministic(src, demo):
    vocab, kg = demo
    again = K.build_graph(reversed(vocab["code"].drop_nulls().to_list()), src, siblings=True)
    assert again.nodes.equals(kg.nodes) and again.edges.equals(kg.edges)


def test_padding_budgets_and_masks(demo):
    _, kg = demo
    g = K.graphs_tuple(kg, n_node=1024, n_edge=4096)
    assert g.nodes["type"].shape == (1024,) and g.senders.shape == (4096,)
    assert g.n_node.tolist() == [kg.n_node, 1024 - kg.n_node]
    assert int(jraph.get_node_padding_mask(g).sum()) == kg.n_node
    emask = np.asarray(jraph.get_edge_padding_mask(g))
    assert int(emask.sum()) == 2 * kg.n_edge
    # inverses: edge i + E is edge i reversed, with relation r + R
    E, R = kg.n_edge, len(kg.relations)
    s, d, r = (np.asarray(x) for x in (g.senders, g.receivers, g.edges["relation"]))
    assert (s[E:2 * E] == d[:E]).all() and (d[E:2 * E] == s[:E]).all() and (r[E:2 * E] == r[:E] + R).all()
    # padding edges and nodes belong to the padding graph
    assert (s[~emask] >= kg.n_node).all() and (d[~emask] >= kg.n_node).all()
    with pytest.raises(K.KnowledgeError, match="budget too small"):
        K.graphs_tuple(kg, n_node=kg.n_node)
    with pytest.raises(K.KnowledgeError, match="budget too small"):
        K.graphs_tuple(kg, n_edge=kg.n_edge)


# ---------------------------------------------------------------- RGCN
def test_layer_agrees_with_per_relation_reference(demo):
    _, kg = demo
    g = K.graphs_tuple(kg)
    R2, D, B = 2 * len(kg.relations), 8, 3
    layer = K.RGCNLayer(D, R2, B, rngs=nnx.Rngs(params=make_key(0, "t")))
    h = np.asarray(jax.random.normal(make_key(0, "h"), (g.nodes["type"].shape[0], D)))
    mask = np.asarray(jraph.get_edge_padding_mask(g))
    s, d, r = (np.asarray(x) for x in (g.senders, g.receivers, g.edges["relation"]))
    norm = K.relation_norm(g.receivers, g.edges["relation"], jnp.asarray(mask), h.shape[0], R2)
    fast = np.asarray(layer(jnp.asarray(h), g.senders, g.receivers, g.edges["relation"], norm))
    basis, coef = np.asarray(layer.basis_BxDxD[...]), np.asarray(layer.coef_RxB[...])
    ref = h @ np.asarray(layer.self_DxD[...]) + np.asarray(layer.bias_D[...])
    for rel in range(R2):
        W = np.einsum("b,bde->de", coef[rel], basis)
        sel = mask & (r == rel)
        for i in np.unique(d[sel]):
            ref[i] += (h[s[sel & (d == i)]] @ W).mean(0)
    np.testing.assert_allclose(fast, ref, atol=1e-4)


def test_gradients_reach_every_basis_and_used_relation_only(demo):
    _, kg = demo
    cfg = K.RGCNConfig.tiny(kg, sup_frac=0.0)
    g = K.graphs_tuple(kg, n_node=cfg.N)
    graphdef, params = nnx.split(K.RGCN(cfg, rngs=nnx.Rngs(params=make_key(0, "init"))))
    grads = jax.jit(jax.grad(lambda p: K.link_loss(nnx.merge(graphdef, p), g, make_key(0, "neg"), jnp.int32(kg.n_node))))(params)
    gl = grads["layers"]
    assert bool((jnp.abs(gl["basis_BxDxD"][...]).sum((2, 3)) > 0).all())          # all layers x bases
    per_rel = np.abs(np.asarray(gl["coef_RxB"][...])).sum((0, 2))
    used = np.zeros(2 * cfg.R, bool)
    used[np.unique(np.asarray(g.edges["relation"])[np.asarray(jraph.get_edge_padding_mask(g))])] = True
    assert (per_rel[used] > 0).all() and (per_rel[~used] == 0).all() and (~used).any()
    assert bool((jnp.abs(grads["rel_RxD"][...]).sum(1)[used[:cfg.R]] > 0).all())
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))


def test_padding_edges_contribute_nothing(demo):
    _, kg = demo
    cfg = K.RGCNConfig.tiny(kg)
    g = K.graphs_tuple(kg, n_node=cfg.N)
    model = K.RGCN(cfg, rngs=nnx.Rngs(params=make_key(0, "init")))
    pad = ~jraph.get_edge_padding_mask(g)
    moved = g._replace(senders=jnp.where(pad, 0, g.senders), receivers=jnp.where(pad, 1, g.receivers),
                       edges={"relation": jnp.where(pad, 3, g.edges["relation"])})
    encode = nnx.jit(lambda m, g: m.encode(g))
    np.testing.assert_array_equal(np.asarray(encode(model, moved)), np.asarray(encode(model, g)))
    loss = nnx.jit(lambda m, g: K.link_loss(m, g, make_key(0, "neg"), jnp.int32(kg.n_node)))
    assert float(loss(model, moved)) == float(loss(model, g))


# ---------------------------------------------------------------- PrimeKG
def test_primekg_loader_on_fixture(src):
    path = FIXTURES / "primekg_small.csv"
    assert tuple(path.read_text().splitlines()[0].split(",")) == K.PRIMEKG_COLUMNS
    cmap = pl.DataFrame({"code": ["ICD10CM/E11.9", "ATC/A10BA02", "ICD10CM/N18"], "x_index": [1003, 20, 1500]})
    kg = K.load_primekg(path, code_map=cmap)
    assert (kg.n_node, kg.n_edge) == (10, 16)
    assert kg.relations == ("contraindication", "indication", "parent-child", "phenotype present",
                            "synergistic interaction", "target")
    assert set(kg.types) == {"drug", "disease", "gene/protein", "effect/phenotype"}
    assert kg.nodes.filter(name="DrugBank/DB00331")["x_index"].item() == 20
    et = kg.edge_table()
    assert len(et.filter(src_name="DrugBank/DB00331", relation_name="indication", dst_name="MONDO/5148")) == 1
    m = K.map_codes(["ICD10CM/E119", "ATC/A10BA02", "ICD10CM/N1831", "ICD10CM/K35"], kg, src)
    assert m["match"].to_list() == ["exact", "exact", "prefix", "unmapped"]
    sub = K.neighborhood(kg, kg.anchors.filter(code="ATC/A10BA02")["node"].to_list(), hops=1)
    assert sub.n_node == 5 and sub.anchors["code"].to_list() == ["ATC/A10BA02", "ICD10CM/E119", "ICD10CM/N18"]
    kgm = K.train_rgcn(kg, K.RGCNConfig.tiny(kg, steps=3, test_frac=0.2), seed=0)   # the same trainer runs on it
    assert np.isfinite(kgm.history["mrr"].to_numpy()).all() and kgm.cfg.R == 6


def test_primekg_loader_errors(tmp_path):
    bad = tmp_path / "kg.csv"
    bad.write_text("relation,display_relation,x_index,x_id,x_type,x_name,x_source,y_index,y_id,y_type,y_name\n")
    with pytest.raises(K.KnowledgeError, match=r"kg.csv: missing column\(s\) \['y_source'\]"):
        K.load_primekg(bad)
    lines = (FIXTURES / "primekg_small.csv").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + [lines[3].replace(",20,", ",twenty,", 1)]) + "\n")
    with pytest.raises(K.KnowledgeError, match=r"must be integers; line\(s\) \[4\]"):
        K.load_primekg(bad)
    with pytest.raises(K.KnowledgeError, match="not in"):
        K.load_primekg(FIXTURES / "primekg_small.csv", code_map=pl.DataFrame({"code": ["ATC/A10BA02"], "x_index": [999]}))


# ---------------------------------------------------------------- training and embeddings
def test_split_keeps_every_node_connected(demo):
    _, kg = demo
    test = K.split_edges(kg, seed=0, test_frac=0.1)
    assert test.sum() == round(0.1 * kg.n_edge)
    train = kg.edges.filter(pl.Series(~test))
    touched = set(train["src"].to_list()) | set(train["dst"].to_list())
    assert touched == set(kg.edges["src"].to_list()) | set(kg.edges["dst"].to_list())
    assert (K.split_edges(kg, seed=0) == test).all() and not (K.split_edges(kg, seed=1) == test).all()


def test_mrr_beats_random_and_untrained(trained):
    f, r0 = trained.final, trained.history.row(0, named=True)
    assert f["mrr"] > 5 * trained.random["mrr"], trained._repr_markdown_()
    assert f["mrr"] > r0["mrr"] + 0.05 and f["hits10"] > trained.random["hits10"] + 0.2, trained._repr_markdown_()
    assert 0.0 < trained.random["mrr"] < 0.05


def test_hierarchy_embeddings_cover_every_code_token(demo, trained):
    vocab, kg = demo
    emb = K.hierarchy_embeddings(vocab, kg, trained)
    has_code = vocab["code"].is_not_null().to_numpy()
    assert emb.shape == (len(vocab), trained.cfg.D) and emb.dtype == np.float32
    assert (np.abs(emb[~has_code]).sum(1) == 0).all()
    assert (np.abs(emb[has_code]).sum(1) > 0).all()
    with pytest.raises(K.KnowledgeError, match="token_id must be"):
        K.hierarchy_embeddings(vocab.filter(pl.col("token_id") != 3), kg, trained)


def test_siblings_closer_than_random_pairs(demo, trained):
    vocab, kg = demo
    emb = K.hierarchy_embeddings(vocab, kg, trained)
    sib = K.sibling_check(emb, vocab["code"].to_list())
    assert {"ICD10CM chapter", "ATC level 2"} <= set(sib["grouping"])
    assert (sib["sibling_dist"] < sib["random_dist"]).all(), sib


def test_resume_after_kill_equals_straight_run(tmp_path, demo):
    _, kg = demo
    cfg = K.RGCNConfig.tiny(kg, steps=10, ckpt_every=5, eval_every=5)
    K.train_rgcn(kg, cfg, seed=3, ckpt_dir=tmp_path / "ck", stop_after=7)   # "killed" after step 7; last save: 5
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["5"]
    resumed = K.train_rgcn(kg, cfg, seed=3, ckpt_dir=tmp_path / "ck")
    straight = K.train_rgcn(kg, cfg, seed=3)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(straight.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history.equals(straight.history)
    with pytest.raises(K.KnowledgeError, match="another graph/config/seed"):
        K.train_rgcn(kg, cfg, seed=4, ckpt_dir=tmp_path / "ck")


def test_write_knowledge_outputs(tmp_path, demo, trained):
    vocab, kg = demo
    paths = K.write_knowledge(tmp_path / "knowledge", vocab, trained)
    emb = np.load(paths["hierarchy"])
    assert emb.shape == (len(vocab), trained.cfg.D)
    np.testing.assert_array_equal(emb, K.hierarchy_embeddings(vocab, kg, trained))
    cov = pl.read_parquet(paths["coverage"])
    assert cov["coverage"].drop_nulls().min() == 1.0 and cov["tokens"].sum() == len(vocab)
    graph = pl.read_parquet(paths["graph"])
    assert len(graph) == kg.n_edge and set(graph["split"]) == {"train", "test"}
    assert {"src_name", "relation_name", "dst_name", "source"} <= set(graph.columns)
    first = {k: p.read_bytes() for k, p in paths.items()}
    again = K.write_knowledge(tmp_path / "knowledge", vocab, trained)
    assert all(again[k].read_bytes() == v for k, v in first.items())    # same inputs, same bytes
    assert not list((tmp_path / "knowledge").glob(".*.tmp"))


def test_knowledge_stage_writes_and_resumes(tmp_path, demo):
    from synehr.core import RunDir
    vocab, kg = demo
    rd = RunDir(tmp_path / "run")
    rd.tokenizer.mkdir(parents=True)
    vocab.write_parquet(rd.tokenizer / "vocab.parquet")
    kw = dict(D=16, B=2, K=4, steps=6, eval_every=3, ckpt_every=3)
    kgm = K.knowledge_stage(rd.root, seed=0, **kw)
    for f in ("hierarchy.npy", "coverage.parquet", "mapping.parquet", "graph.parquet", "nodes.parquet", "metrics.json"):
        assert (rd.knowledge / f).exists(), f
    assert (rd.figures / "rgcn_link_prediction.png").stat().st_size > 10_000
    assert np.load(rd.knowledge / "hierarchy.npy").shape == (len(vocab), 16)
    before = (rd.knowledge / "hierarchy.npy").read_bytes()
    again = K.knowledge_stage(rd.root, seed=0, **kw)        # resumes from the final checkpoint: nothing to train
    assert (rd.knowledge / "hierarchy.npy").read_bytes() == before
    assert again.history.equals(kgm.history)
