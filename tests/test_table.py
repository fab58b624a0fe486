"""The one table renderer (zoo.core.table) and the one plugin summary (zoo.plugins.summary)
that every command and report uses."""

from __future__ import annotations

import zoo
from zoo.cli import main
from zoo.core.table import markdown_table, table, table_lines
from zoo.doctor import report
from zoo.plugins.summary import plugin_summary


def test_columns_are_as_wide_as_their_widest_cell_and_lines_end_without_spaces():
    rows = [("name", "size", "note"), ("resnet18", "44.7 MB", ""), ("vit", "1 KB", "tiny")]
    assert table(rows).splitlines() == [
        "name      size     note",
        "resnet18  44.7 MB",
        "vit       1 KB     tiny",
    ]


def test_numbers_align_right_and_a_rule_goes_under_the_header():
    rows = [("#", "strategy", "acc %"), ("1", "full", "91.5"), ("10", "linear_probe", "8.0")]
    assert table_lines(rows, right={0, 2}, rule=True) == [
        " #  strategy      acc %",
        "--  ------------  -----",
        " 1  full           91.5",
        "10  linear_probe    8.0",
    ]


def test_no_rows_is_no_lines():
    assert table_lines([]) == []
    assert table([]) == ""


def test_markdown_right_aligns_the_numbers_and_escapes_a_pipe_in_a_cell():
    rows = [("backbone", "acc %"), ("a|b", "50.0")]
    assert markdown_table(rows, right={1}).splitlines() == [
        "| backbone | acc % |",
        "|---|---:|",
        "| a\\|b | 50.0 |",
    ]


def test_zoo_plugins_and_zoo_doctor_report_the_same_summary(tiny, capsys):
    plugins, _ = plugin_summary()
    mine = next(p for p in plugins if p.backbones == 1 and "register_backbones" in p.hooks
                and p.name.startswith("test-backbones-"))
    assert zoo.get_backbone("tiny_cnn").plugin == mine.name
    assert main(["plugins"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith(mine.name))
    assert row.split() == [mine.name, "register_backbones", "1", "0", "0"]
    assert f"plugin {mine.name}: 1 backbones, 0 strategies, 0 datasets" in report().splitlines()
    timm = next(p for p in plugins if p.name == "zoo_timm")
    assert timm.families == ("timm/*",)  # a family, built on demand, is listed by pattern
    datasets = next(p for p in plugins if p.name == "zoo_datasets")
    assert (datasets.hooks, datasets.datasets) == (("register_datasets",), 2)
