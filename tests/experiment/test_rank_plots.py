import math

from rankdyna_trainer.experiment.rank_plots import rank_grid, save_rank_heatmap, split_matrix_name


def test_split_matrix_name():
    assert split_matrix_name("bert.encoder.layer.11.attention.self.query") == (11, "attention.self.query")
    assert split_matrix_name("model.layers.0.mlp.down_proj") == (0, "mlp.down_proj")
    assert split_matrix_name("pre_classifier") == (None, "pre_classifier")


def test_rank_grid_places_every_rank_once():
    ranks = {"m.layer.1.q": 3, "m.layer.0.q": 5, "m.layer.0.ffn": 7, "head": 2}
    layers, kinds, grid = rank_grid(ranks)
    assert layers == ["0", "1", "other"] and kinds == ["q", "ffn", "head"]
    cells = {(layers[i], kinds[j]): grid[i, j] for i in range(3) for j in range(3) if not math.isnan(grid[i, j])}
    assert cells == {("1", "q"): 3, ("0", "q"): 5, ("0", "ffn"): 7, ("other", "head"): 2}


def test_heatmap_png_is_written(tmp_path):
    ranks = {f"enc.layer.{l}.{k}": l + 1 for l in range(3) for k in ("q", "v")}
    path = save_rank_heatmap(ranks, {name: 8 for name in ranks}, str(tmp_path / "ranks.png"), title="t")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_full_ranks_cover_ffn_channel_groups(tmp_path):
    from rankdyna_trainer import RankDynaConfig, prepare_model
    from rankdyna_trainer.experiment.wandb_logging import full_ranks
    from rankdyna_trainer.methods.rankdyna import rank_pattern
    from tests.conftest import tiny_llama

    model = prepare_model(tiny_llama(), RankDynaConfig(ffn_groups="channels"))
    ranks, full = rank_pattern(model), full_ranks(model)
    assert full.keys() == ranks.keys()
    assert full["model.layers.0.mlp.down_proj"] == 64 and full["model.layers.0.self_attn.k_proj"] == 16
    data = open(save_rank_heatmap(ranks, full, str(tmp_path / "ranks.png")), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
