"""What a newcomer trips on: mistyped options and genes, early manifest errors, figure files, table wording."""
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fixtures_cli import run_cli


def test_mistyped_option_suggests_the_right_one_in_one_line(capsys):
    code, _, err = run_cli(capsys, "plot", "x.h5ad", "--gene", "ERBB2")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "--genes" in lines[0] and "DEEPSPOT_DEBUG" not in err, err


def test_missing_gene_message_suggests_the_case_and_how_to_add_markers():
    from deepspot.plotting import missing_genes_message

    names = ["EPCAM", "VIM", "KRT19"]
    msg = missing_genes_message(["epcam"], names)
    assert "did you mean EPCAM" in msg and "--add-genes" not in msg
    msg = missing_genes_message(["ERBB2"], names)
    assert "ERBB2" in msg and "--add-genes" in msg and "3 genes" in msg


def test_plot_of_a_gene_outside_the_panel_says_how_to_add_it(tmp_path, capsys):
    a = ad.AnnData(np.random.default_rng(0).random((5, 2)).astype(np.float32),
                   var=pd.DataFrame(index=["EPCAM", "VIM"]))
    a.obsm["spatial"] = np.arange(10, dtype=float).reshape(5, 2) * 10
    a.write_h5ad(tmp_path / "p.h5ad")
    code, _, err = run_cli(capsys, "plot", tmp_path / "p.h5ad", "--genes", "ERBB2,vim")
    assert code == 1 and "did you mean VIM" in err and "train --add-genes" in err, err
    assert not (tmp_path / "p.png").exists()


def test_model_gene_check_suggests_the_case():
    from deepspot.config import CheckpointError, ModelConfig

    cfg = ModelConfig.__new__(ModelConfig)
    object.__setattr__(cfg, "genes", ["ERBB2", "EPCAM"])
    with pytest.raises(CheckpointError, match="did you mean erbb2 -> ERBB2"):
        cfg.check_genes(["erbb2"])
    with pytest.raises(CheckpointError, match="--add-genes"):
        cfg.check_genes(["CD74"])


def test_a_bad_manifest_is_reported_before_torch_is_imported(tmp_path):
    (tmp_path / "m.csv").write_text("sample_id,image\nA,a.png\n")
    code = ("import sys\nfrom deepspot.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, "train", "--manifest", str(tmp_path / "m.csv"), "--out",
                        str(tmp_path / "model")], capture_output=True, text=True, timeout=300)
    assert "manifest lacks columns" in r.stderr and r.stdout.strip() == "exit 1 False", (r.stdout, r.stderr)


def test_a_figure_file_appears_only_once_rendered(tmp_path):
    """Rendering takes seconds: nothing (not even an empty .partial.png) is on disk while it runs, so a
    killed process leaves nothing behind."""
    from deepspot.io.outputs import write_figure

    seen = []

    class Fig:
        def savefig(self, target, **kw):
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            target.write(b"\x89PNG fake")

    write_figure(Fig(), tmp_path / "f.png")
    assert seen == [[]] and [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_deepcell_score_table_counts_cells():
    from deepspot.evaluation.holdout import score_table

    s = {"pearson_mean": 0.1, "spearman_mean": 0.1, "mse": 1.0, "n_genes_scored": 3, "n_spots": 40}
    assert "held-out cells" in score_table({"deepcell": s, "ridge": s}).columns
    assert "held-out spots" in score_table({"deepspot": s, "ridge": s}).columns


def test_add_genes_appends_markers_the_hvgs_lack():
    from deepspot.training.targets import select_genes, select_panel

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(3, (60, 30)).astype(np.float32), var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    top = select_genes(a, n_top=5)
    extra = next(g for g in a.var_names if g not in top)
    assert select_genes(a, n_top=5, add=[extra, top[0]]) == top + [extra]
    assert select_panel({"a": a}, n_top=5, add=[extra])[-1] == extra
    with pytest.raises(ValueError, match="not in the data"):
        select_genes(a, n_top=5, add=["NOPE"])
