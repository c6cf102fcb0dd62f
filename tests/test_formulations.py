"""The formulations of the paper's comparison (sd3mini.formulations) and the toy experiments' backbones."""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from sd3mini import formulations as fm
from sd3mini.book import RESULTS
from sd3mini.flow import get_sigmas, time_shift
from sd3mini.sampling import euler_step
from sd3mini.toy import paper
from sd3mini.toy.backbones import build_backbone
from sd3mini.toy.model import toy_mmdit_config


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g), \
        torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.97])


@pytest.mark.parametrize("name", fm.FORMULATIONS)
def test_the_target_read_back_gives_the_clean_image_and_the_noise(name, batch):
    x0, eps, t = batch
    z = fm.noisy(name, x0, eps, t)
    x0_hat, eps_hat = fm.predict_x0_eps(name, fm.target(name, x0, eps, t), z, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=2e-5, rtol=1e-5)
    assert fm.rf_velocity_error(name, fm.target(name, x0, eps, t), z, t, x0, eps).max() < 1e-8
    assert fm.loss(name, fm.target(name, x0, eps, t), x0, eps, t) < 1e-10


@pytest.mark.parametrize("name", fm.FORMULATIONS)
def test_every_path_has_the_signal_to_noise_ratio_of_rectified_flow_at_the_same_u(name, batch):
    _, _, t = batch
    a, b = fm.path(name, t)
    torch.testing.assert_close(b / a, t / (1 - t))
    if fm.PATHS[name] == "vp":
        torch.testing.assert_close(a**2 + b**2, torch.ones_like(t))


def test_rectified_flow_is_sd3s_own_loss_and_sampler(batch):
    x0, eps, t = batch
    v = torch.randn_like(x0)
    sd3_loss = torch.mean((v - (eps - x0)) ** 2)
    assert torch.equal(fm.loss("rf/lognorm", v, x0, eps, t), sd3_loss)
    assert torch.equal(fm.sampling_t("rf/uniform", 7, 3.0), get_sigmas(7, 3.0))
    z = fm.noisy("rf/lognorm", x0, eps, t)
    for i in range(len(t)):                  # DDIM on the straight path is SD3's Euler step
        x0_hat, eps_hat = fm.predict_x0_eps("rf/lognorm", v[i:i + 1], z[i:i + 1], t[i:i + 1])
        step = fm.ddim_step("rf/lognorm", x0_hat, eps_hat, torch.tensor(0.1))
        torch.testing.assert_close(step, euler_step(z[i:i + 1], x0_hat, t[i], torch.tensor(0.1)))



def test_heun_solves_edms_ode_to_second_order():
    # Data x0 ~ N(0, s^2): the exact eps_hat at (z, sigma) is sigma z / (s^2 + sigma^2) (a = 1), and the
    # ODE's solution from sigma_0 is z * sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)). Doubling the steps
    # should halve Euler's error (first order) and quarter Heun's (second order).
    s2 = 0.25
    sigma = lambda t: t / (1 - t)  # noqa: E731
    def predict(z, t):
        eps_hat = sigma(t) * z / (s2 + sigma(t) ** 2)
        return z - sigma(t) * eps_hat, eps_hat
    errors = []
    for steps in (20, 40):
        ts, start = torch.linspace(0.9, 0.2, steps + 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        exact = start * math.sqrt((s2 + sigma(ts[-1]) ** 2) / (s2 + sigma(ts[0]) ** 2))
        euler, heun = start, start
        for t, t_next in zip(ts[:-1], ts[1:]):
            euler = fm.ddim_step("edm", *predict(euler, t), t_next)
            x0_hat, eps_hat = predict(heun, t)
            _, eps_hat_next = predict(fm.ddim_step("edm", x0_hat, eps_hat, t_next), t_next)
            heun = fm.heun_step("edm", x0_hat, eps_hat, eps_hat_next, t, t_next)
        errors.append((float((euler - exact).abs()), float((heun - exact).abs())))
    (euler_20, heun_20), (euler_40, heun_40) = errors
    assert 1.8 < euler_20 / euler_40 < 2.2 and 3.6 < heun_20 / heun_40 < 4.4 and heun_40 < euler_40 / 10, errors
    with pytest.raises(ValueError, match="EDM's sampler"):
        fm.heun_step("rf/lognorm", x0_hat, eps_hat, eps_hat_next, ts[0], ts[1])


@pytest.mark.parametrize("name", fm.FORMULATIONS)
def test_sampling_schedules_fall_to_zero_and_are_shifted(name):
    ts = fm.sampling_t(name, 10, 3.0)
    assert len(ts) == 11 and ts[-1] == 0 and bool((ts[:-1] > ts[1:]).all())
    if name == "eps/linear":                 # LDM's schedule never reaches pure noise (the known flaw)
        ab = fm.ldm_alphas_cumprod()[-1]
        top = float((1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt()))
        assert ts[0] == pytest.approx(float(time_shift(torch.tensor(top), 3.0)), rel=1e-5)
    if name == "edm":
        assert ts[0] == pytest.approx(float(time_shift(torch.tensor(160 / 161), 3.0)), rel=1e-5)


@pytest.mark.parametrize("name", fm.FORMULATIONS)
def test_training_noise_levels_follow_each_formulation(name):
    t = fm.train_t(name, 20000, torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t < 1)).all())
    median = float(t.median())
    expected = {"rf/lognorm": 0.5, "rf/uniform": 0.5, "v/cos": 0.5,
                "edm": math.exp(fm.EDM_P_MEAN) / (1 + math.exp(fm.EDM_P_MEAN))}
    if name in expected:
        assert median == pytest.approx(expected[name], abs=0.02)
    with pytest.raises(ValueError, match="unknown formulation 'ddpm'"):
        fm.train_t("ddpm", 3)


@pytest.mark.parametrize("kind,depth", [("mmdit", 4), ("dit", 7), ("crossdit", 5)])
def test_backbones_start_as_zero_and_have_matched_sizes(kind, depth):
    torch.manual_seed(0)
    net = build_backbone(kind, toy_mmdit_config(128, depth, 4, 128, heads=2))
    out = net(torch.randn(2, 3, 32, 32), torch.tensor([500.0, 10.0]), y=torch.randn(2, 128),
              context=torch.randn(2, 16, 128))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() == 0          # adaLN-Zero: v = 0 at the start
    params = sum(p.numel() for p in net.parameters())
    assert abs(params / 2_305_840 - 1) < 0.05                              # MM-DiT, depth 4, width 128


def test_a_backbone_learns_from_the_text():
    """After one step the output depends on the caption for every backbone (the text reaches the image)."""
    for kind in ("mmdit", "dit", "crossdit"):
        torch.manual_seed(0)
        net = build_backbone(kind, toy_mmdit_config(32, 2, 4, 16, heads=1))
        for p in net.parameters():                                         # leave adaLN-Zero's identity
            p.data.add_(0.05 * torch.randn_like(p))
        x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([500.0]), torch.zeros(1, 16)
        a = net(x, t, y=y, context=torch.randn(1, 5, 16))
        b = net(x, t, y=y, context=torch.randn(1, 5, 16))
        assert (a - b).abs().max() > 1e-4, kind


def test_an_experiment_arm_runs_end_to_end():
    result = paper.run_arm(paper.Arm(formulation="edm", backbone="crossdit", depth=1, width=32, heads=1, steps=4,
                                     batch=4), val_every=2, judge_captions=4)
    assert [row["step"] for row in result["val"]] == [2, 4]
    assert len(result["val"][-1]["per_level"]) == paper.VAL_LEVELS and math.isfinite(result["val"][-1]["loss"])
    assert set(result["judge"]) == {"5", "10", "25"}
    assert result["judge"]["5"]["singles"]["n"] == 2 and result["flops_per_image"] > 0


def test_noise_levels_retrains_each_formulation_and_draws_its_pictures(tmp_path):
    from PIL import Image
    base = paper.Arm(depth=1, width=32, heads=1, steps=4, batch=4)
    target = paper.noise_levels(base, tmp_path, results=tmp_path, gap_captions=4)
    result = json.loads(target.read_text())
    assert [a["arm"]["formulation"] for a in result["arms"]] == list(fm.FORMULATIONS)
    assert len(result["levels"]) == paper.VAL_LEVELS + len(paper.HIGH_LEVELS) == len(result["arms"][0]["per_level"])
    rows, tile, gap = len(result["png"]["rows"]), result["png"]["tile"], result["png"]["gap"]
    side = lambda n: n * tile + (n - 1) * gap  # noqa: E731
    assert Image.open(target.with_suffix(".png")).size == (side(len(result["captions"])), side(rows))
    assert len(list((tmp_path / "models").iterdir())) == len(fm.FORMULATIONS)
    assert all(set(a["few_step_gap"]) == {"5", "10", "25"} for a in result["arms"])
    # edm-sampler judges the kept EDM model with Heun's steps beside Euler's
    edm = json.loads(paper.edm_sampler(replace(base, formulation="edm"), tmp_path, tmp_path, 4).read_text())
    assert edm["network_calls"] == {"euler": {"5": 5, "10": 10, "25": 25}, "heun": {"5": 9, "10": 19, "25": 49}}
    assert set(edm["euler"]) == set(edm["heun"]) == {"5", "10", "25"} and edm["arm"]["formulation"] == "edm"
    with pytest.raises(FileNotFoundError, match="noise-levels trains and keeps it"):
        paper.edm_sampler(replace(base, formulation="edm", seed=1), tmp_path, tmp_path, 4)


def test_sweep_runs_arms_side_by_side_and_skips_finished_ones(tmp_path, monkeypatch):
    arms = [paper.Arm(formulation=f, depth=1, width=32, heads=1, steps=3, batch=2) for f in ("rf/lognorm", "edm")]
    monkeypatch.setattr(paper, "experiment_arms", lambda name, seeds: arms)
    paper.sweep("formulations", [0], tmp_path, workers=2)
    files = {a.name(): tmp_path / "arms" / f"{a.name()}.json" for a in arms}
    results = {name: json.loads(path.read_text()) for name, path in files.items()}
    assert [results[a.name()]["arm"]["formulation"] for a in arms] == ["rf/lognorm", "edm"]
    assert all([e["step"] for e in r["val"]] == [3] for r in results.values())    # validated at the end
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    paper.sweep("formulations", [0], tmp_path)                                        # nothing left to run
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == stamps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                    # as each worker runs, and as the CLI does
    try:
        paper.sweep("formulations", [0], tmp_path / "alone")                         # one at a time
    finally:
        torch.set_num_threads(threads)
    alone = {a.name(): json.loads((tmp_path / "alone" / "arms" / f"{a.name()}.json").read_text()) for a in arms}
    assert all(alone[n]["val"] == results[n]["val"] and alone[n]["judge"] == results[n]["judge"] for n in alone)


def test_collect_merges_finished_arms_and_lists_the_missing(tmp_path):
    arms = paper.experiment_arms("formulations", [0])
    (tmp_path / "arms").mkdir()
    for arm in arms[:2]:
        (tmp_path / "arms" / f"{arm.name()}.json").write_text(json.dumps({"arm": {"name": arm.name()}}))
    target = paper.collect("formulations", tmp_path, seeds=[0], results=tmp_path)
    merged = json.loads(target.read_text())
    assert target.name == "paper_formulations.json"
    assert [a["arm"]["name"] for a in merged["arms"]] == [a.name() for a in arms[:2]]
    assert merged["missing"] == [a.name() for a in arms[2:]] and len(arms) == 5


def test_experiments_share_the_base_arm_and_match_the_issue():
    arms = {e: paper.experiment_arms(e, [0, 1, 2]) for e in ("formulations", "backbones", "scaling")}
    names = {e: [a.name() for a in group] for e, group in arms.items()}
    base = paper.Arm(seed=1)
    assert base.name() in names["formulations"] and base.name() in names["backbones"]   # one run serves both
    assert all(a.width == 32 * a.heads for a in arms["scaling"])    # 32 channels a head at every depth, so
    assert base.name() not in names["scaling"]                      # depth 4 is not the base arm (2 heads)
    assert len({n for group in names.values() for n in group}) == 15 + 12 + 15 - 3   # names never collide
    assert len(names["formulations"]) == 15 and len(names["scaling"]) == 15 and len(names["backbones"]) == 12


def test_summary_pools_the_seeds_of_each_configuration():
    def arm(formulation, seed, loss, cell):
        return {"arm": {**asdict(paper.Arm(formulation=formulation, seed=seed))}, "params": 10,
                "flops_per_image": 20, "val": [{"step": 1, "loss": 9.0}, {"step": 2, "loss": loss}],
                "judge": {"5": {"singles": {"cell": cell, "n": 60}}}}
    results = {"arms": [arm("rf/lognorm", 0, 0.2, 1.0), arm("edm", 0, 0.1, 0.5), arm("rf/lognorm", 1, 0.4, 0.5)]}
    rows = paper.summary(results)
    assert [(r["formulation"], r["seeds"]) for r in rows] == [("rf/lognorm", [0, 1]), ("edm", [0])]
    assert rows[0]["val"] == {"mean": pytest.approx(0.3), "min": 0.2, "max": 0.4}
    assert rows[0]["judge"]["5"]["singles"] == {"cell": {"mean": 0.75, "min": 0.5, "max": 1.0}}
    assert rows[1]["val"] == {"mean": 0.1, "min": 0.1, "max": 0.1} and rows[0]["params"] == 10


def test_summary_reads_the_shipped_formulations():
    shipped = json.loads((RESULTS / "paper_formulations.json").read_text())
    rows = paper.summary(shipped)
    assert {r["formulation"] for r in rows} == set(fm.FORMULATIONS)
    assert sum(len(r["seeds"]) for r in rows) == len(shipped["arms"])
    assert all(r["val"]["min"] <= r["val"]["mean"] <= r["val"]["max"] for r in rows)


@pytest.mark.parametrize("name", ["formulations", "backbones", "scaling"])
def test_each_shipped_experiment_is_complete_and_is_the_models_its_arms_name(name):
    shipped = json.loads((RESULTS / f"paper_{name}.json").read_text())
    arms = paper.experiment_arms(name, [0, 1, 2])
    assert shipped["missing"] == [] and [a["arm"] for a in shipped["arms"]] == [asdict(a) for a in arms]
    for arm, result in zip(arms, shipped["arms"]):      # the sizes the chapter prints are the arm's model
        if arm.seed == 0:
            model = paper.Denoiser(arm, paper.short_recipe(arm))
            assert result["params"] == sum(p.numel() for p in model.net.parameters())
            assert result["flops_per_image"] == paper.flops_per_image(model)
        assert [e["step"] for e in result["val"]] == list(range(250, 2001, 250))
    if name == "backbones":      # MM-DiT d4 is the formulations' rf/lognorm arm, run once for both
        formulations = json.loads((RESULTS / "paper_formulations.json").read_text())["arms"]
        base = [a for a in formulations if a["arm"]["formulation"] == "rf/lognorm"]
        assert [a for a in shipped["arms"] if a["arm"]["backbone"] == "mmdit"] == base


def test_compute_curves_frontier_and_power_law():
    def arm(depth, seed, losses, flops_per_step):
        return {"arm": asdict(paper.Arm(depth=depth, seed=seed)), "train_flops_per_step": flops_per_step,
                "val": [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]}
    results = {"arms": [arm(1, 0, [0.5, 0.3, 0.2], 1), arm(1, 1, [0.7, 0.5, 0.4], 1),    # mean 0.6, 0.4, 0.3
                        arm(2, 0, [0.5, 0.2, 0.1], 4)]}
    curves = paper.compute_curves(results)
    assert [(c["depth"], c["flops"]) for c in curves] == [(1, [10, 20, 30]), (2, [40, 80, 120])]
    assert [round(l["mean"], 6) for l in curves[0]["loss"]] == [0.6, 0.4, 0.3]
    assert curves[0]["loss"][2]["min"] == 0.2 and curves[0]["loss"][2]["max"] == 0.4
    # depth 2's first point (compute 40, loss 0.5) is beaten by depth 1 at compute 30 (0.3): not on the frontier
    front = paper.frontier(curves)
    assert [(p["flops"], round(p["loss"], 6), p["curve"]) for p in front] == [
        (10, 0.6, 0), (20, 0.4, 0), (30, 0.3, 0), (80, 0.2, 1), (120, 0.1, 1)]
    compute = [1e6, 1e7, 1e9]
    fit = paper.power_law(compute, [3.0 * c ** -0.25 for c in compute])
    assert fit["slope"] == pytest.approx(-0.25) and fit["k"] == pytest.approx(3.0)


def test_the_shipped_edm_sampler_file_repeats_the_sweeps_euler_scores():
    # The same model (noise-levels retrains the sweep's seed-0 arm), captions and noises: Euler's scores
    # must be the sweep's own, or the file judged some other model.
    shipped = json.loads((RESULTS / "paper_edm_sampler.json").read_text())
    sweep = json.loads((RESULTS / "paper_formulations.json").read_text())
    arm = next(a for a in sweep["arms"] if a["arm"] == shipped["arm"])
    assert json.dumps(shipped["euler"], sort_keys=True) == json.dumps(arm["judge"], sort_keys=True)
    assert shipped["heun"] != shipped["euler"]
