"""nfnet.optim.SGD: torch.optim.SGD's multi-tensor update to the bit, its state_dict both ways, no torch._dynamo."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nfnet
from nfnet.optim import SGD
from studies.training.loop import param_groups

ROOT = Path(__file__).resolve().parent.parent


def model():
    torch.manual_seed(0)
    return nfnet.create_model("nf_resnet_cifar", num_classes=10, width=8, depth=1)


def batches(n, channels_last=False):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(32, 3, 16, 16, generator=gen)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    torch.randint(0, 10, (32,), generator=gen)))
    return out


def train(m, opt, data, steps, channels_last=False):
    for step in steps:
        x, y = data[step]
        opt.zero_grad(set_to_none=True)
        for g in opt.param_groups:  # as the schedule does: a new lr every step
            g["lr"] = 0.05 * (step + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=channels_last):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        if step == 1:  # a parameter without a gradient this step (frozen for one step) is left alone
            next(m.parameters()).grad = None
        opt.step()


@pytest.mark.parametrize("nesterov,momentum,wd,channels_last", [(True, 0.9, 5e-5, False), (True, 0.9, 5e-5, True),
                                                                (False, 0.9, 1e-3, False), (False, 0.0, 0.0, False)])
def test_the_same_bits_as_torchs_multi_tensor_sgd(nesterov, momentum, wd, channels_last):
    a, b = model(), model()
    if channels_last:
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    theirs = torch.optim.SGD(param_groups(a, wd), lr=0.1, momentum=momentum, nesterov=nesterov, foreach=True)
    ours = SGD(param_groups(b, wd), lr=0.1, momentum=momentum, nesterov=nesterov)
    data = batches(5, channels_last)
    train(a, theirs, data, range(5), channels_last)
    train(b, ours, data, range(5), channels_last)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # the same layout: a checkpoint of either loads into the other
    assert sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in sa["state"])


def test_a_checkpoint_of_either_resumes_in_the_other_to_the_same_bits():
    data = batches(6)
    ref, m = model(), model()
    train(ref, torch.optim.SGD(param_groups(ref, 5e-5), lr=0.1, momentum=0.9, nesterov=True, foreach=True), data,
          range(6))
    theirs = torch.optim.SGD(param_groups(m, 5e-5), lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    train(m, theirs, data, range(3))
    ours = SGD(param_groups(m, 5e-5), lr=0.1, momentum=0.9, nesterov=True)
    ours.load_state_dict(theirs.state_dict())  # torch's checkpoint, resumed here
    train(m, ours, data, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), m.parameters()))
    back = torch.optim.SGD(param_groups(model(), 5e-5), lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    back.load_state_dict(ours.state_dict())  # and ours into torch's
    assert back.state_dict()["param_groups"] == ours.state_dict()["param_groups"]
    assert all(torch.equal(back.state_dict()["state"][i]["momentum_buffer"], v["momentum_buffer"])
               for i, v in ours.state_dict()["state"].items())


def test_a_state_of_other_groups_is_refused():
    m = model()
    ours = SGD(param_groups(m, 5e-5), lr=0.1, momentum=0.9, nesterov=True)
    other = SGD([{"params": list(m.parameters())}], lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="parameter groups"):
        ours.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="momentum"):
        SGD(param_groups(m, 0.0), lr=0.1, momentum=0.0, nesterov=True)


def test_training_on_cpu_never_imports_torch_dynamo(tiny_data):
    # torch.optim imports torch._dynamo on first use: ~1.2-1.9 s of CPU in every process that trains
    code = ("import sys; from studies.training import loop; from tests.helpers import tiny_cfg; "
            f"loop.train(tiny_cfg(max_steps=4), {tiny_data!r}, loop.WorkerContext(print=lambda *_: None)); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
