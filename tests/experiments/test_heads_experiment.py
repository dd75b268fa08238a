"""experiments/heads.py: its section of docs/results.md and its table, from known inputs."""

from experiments.heads import BEGIN, END, METHODS, findings, table, write_section


def test_write_section_touches_only_its_markers(tmp_path):
    path = tmp_path / "docs" / "results.md"
    path.parent.mkdir()
    write_section(path, "first")  # created
    assert path.read_text().count(BEGIN) == 1 and "first" in path.read_text()
    other = "<!-- theory:begin -->\nkeep me\n<!-- theory:end -->"
    path.write_text(path.read_text() + "\n" + other + "\n")
    write_section(path, "second\nwith $1 and \\1")  # regex specials stay literal
    text = path.read_text()
    assert "first" not in text and "second\nwith $1 and \\1" in text and other in text
    assert text.index(BEGIN) < text.index("second") < text.index(END)
    plain = tmp_path / "plain.md"
    plain.write_text("# Notes\n")
    write_section(plain, "appended")
    assert plain.read_text().startswith("# Notes\n") and plain.read_text().rstrip().endswith(END)


def _run(method, seed, acc, trace, width):
    return {"method": method, "head": METHODS[method]["head"], "head_kwargs": METHODS[method].get("head_kwargs") or {},
            "gap": 2.0 if method == "discounted" else 0.0, "seed": seed, "fit_s": 1.0, "test_acc": acc,
            "test_nll": 0.1, "test_ece": 0.01, "hessian_trace": trace, "width": width, "train_acc": 1.0,
            "logit_scale": 8.0, "normalised_margins": [0.1 * k for k in range(11)]}


def test_table_and_findings_from_known_runs():
    runs = [_run("discounted", 0, 0.90, 10.0, 1.0), _run("discounted", 1, 0.94, 30.0, 3.0),
            _run("CosFace", 0, 0.97, 5.0, 4.0), _run("CosFace", 1, 0.95, 7.0, 6.0)]
    text = table(runs)
    row = next(line for line in text.splitlines() if line.startswith("| discounted (g = 2)"))
    # mean ± sample std of 0.90 and 0.94, of 10 and 30; margins 0..1: q10 0.1, median 0.5
    assert "0.920 ± 0.028" in row and "20.0 ± 14.1" in row and "0.100 / 0.500" in row
    said = findings(runs)
    assert "Lowest mean Hessian trace: CosFace; the discounted loss ranks 2 of 2" in said
    assert "Lowest mean gradient-norm width: discounted; the discounted loss ranks 1 of 2" in said
    assert "Highest mean test accuracy: CosFace (0.960)" in said
