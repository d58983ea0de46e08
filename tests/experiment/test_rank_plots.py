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
