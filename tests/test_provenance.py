"""What a run records about the software and machines it trained on (cafedist/provenance.py)."""

from __future__ import annotations

import torch

from cafedist import provenance
from cafedist.train.startup import _with_environment

STACK = {"cafedist": "0.1.0", "python": "3.11.7", "torch": "2.13.0", "numpy": "2.0", "cuda": None, "cudnn": None}


def test_an_environment_summarizes_the_ranks_machines():
    machines = [{"host": "n2", "cpu": "EPYC", "device": "H100"}, {"host": "n1", "cpu": "EPYC", "device": "H100"},
                {"host": "n1", "cpu": "Xeon", "device": "A100"}]
    env = provenance.environment(STACK, machines)
    assert env == {**STACK, "hosts": ["n1", "n2"], "cpus": ["EPYC", "Xeon"], "devices": ["A100", "H100"]}


def test_this_process_software_and_machine():
    soft = provenance.software()
    assert soft["torch"] == torch.__version__ and soft["cuda"] == torch.version.cuda
    assert set(provenance.machine(torch.device("cpu"))) == {"host", "cpu", "device"}
    assert provenance.machine(torch.device("cpu"))["device"] == "cpu"


def test_only_result_changing_fields_are_differences():
    before = provenance.environment(STACK, [{"host": "a", "cpu": "EPYC", "device": "cpu"}])
    moved = provenance.environment({**STACK, "python": "3.12.0"}, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert provenance.result_differences(before, moved) == []  # another host or Python: the same bits
    other = provenance.environment({**STACK, "torch": "2.14.0"}, [{"host": "a", "cpu": "Xeon", "device": "cpu"}])
    assert provenance.result_differences(before, other) == ["torch: 2.13.0 -> 2.14.0", "cpus: EPYC -> Xeon"]
    assert provenance.result_differences({"torch": "2.13.0"}, other) == ["torch: 2.13.0 -> 2.14.0"]  # older record


def test_a_stack_is_recorded_once_whatever_nodes_it_ran_on():
    first = provenance.environment(STACK, [{"host": "a", "cpu": "EPYC", "device": "cpu"}])
    requeued = provenance.environment(STACK, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert _with_environment(None, first) == [first]
    assert _with_environment([first], requeued) == [first]  # a requeue onto another node of the cluster
    newer = provenance.environment({**STACK, "torch": "2.14.0"}, [{"host": "b", "cpu": "EPYC", "device": "cpu"}])
    assert _with_environment([first], newer) == [first, newer]
    assert _with_environment("garbage", first) == [first]  # a malformed record is no stack
