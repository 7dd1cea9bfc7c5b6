"""The machine record: enough to tell CPU kinds apart, nothing that names the host."""

import json
import platform

from ddgpipe.experiments.common import UNRECORDED_MACHINE, machines_line, run_machine
from ddgpipe.machine import cpu_name, machine_info


def test_the_record_names_the_cpu_kind_and_vector_unit_but_not_the_host():
    info = machine_info()
    assert info["processor"] == cpu_name() and info["processor"]
    assert info["cpu_capability"] and info["cpu_count"] >= 1
    assert platform.node() not in json.dumps(info)


def test_a_grid_from_several_machines_says_so(tmp_path):
    for name, machine in [("a", {"processor": "CPU A", "cpu_capability": "AVX2"}),
                          ("b", {"processor": "CPU B", "cpu_capability": "AVX512"}),
                          ("c", None)]:
        (tmp_path / name).mkdir()
        saved = {"seed": 0} | ({"machine": machine} if machine else {})
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
    a, b, c = (run_machine(tmp_path / n) for n in "abc")
    assert (a, b, c) == ("CPU A (AVX2)", "CPU B (AVX512)", UNRECORDED_MACHINE)
    assert machines_line([{"machine": a}, {"machine": a}]) == (
        "Every run was trained on one kind of machine: CPU A (AVX2).")
    mixed = machines_line([{"machine": a}, {"machine": a}, {"machine": b}, {"machine": c}])
    assert "several kinds of machine" in mixed and "2 on CPU A (AVX2); 1 on CPU B" in mixed
    assert machines_line([]) == ""
