"""Training-step speed: forward+backward images/s of our nfnet_f0 vs timm's dm_nfnet_f0 (random init), same
batch and resolution, interleaved repetitions in one run. On GPU both use channels_last + bf16 autocast."""

import timm
import torch
import torch.nn.functional as F
from _common import describe, parser, setup, time_pair

from nfnet import create_model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=0, help="0: 4 on CPU, 64 on GPU")
    p.add_argument("--size", type=int, default=0, help="0: 128 on CPU, 192 (F0 train size) on GPU")
    args = p.parse_args()
    device = setup(args)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 4)
    size = args.size or (192 if gpu else 128)
    torch.manual_seed(0)
    ours = create_model("nfnet_f0").to(device)
    peer = timm.create_model("dm_nfnet_f0", pretrained=False).to(device)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    ours, peer = ours.to(memory_format=fmt).train(), peer.to(memory_format=fmt).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(model):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    t_ours, t_peer = time_pair(step(ours), step(peer), args.reps, device, warmup=2)
    n_ours = sum(q.numel() for q in ours.parameters()) / 1e6
    n_peer = sum(q.numel() for q in peer.parameters()) / 1e6
    print(f"device: {describe(device)}; batch {batch} at {size}px, bf16/channels_last: {gpu}")
    print(f"ours nfnet_f0 ({n_ours:.1f}M params):     {t_ours * 1e3:8.1f} ms/step  {batch / t_ours:8.2f} img/s")
    print(f"timm dm_nfnet_f0 ({n_peer:.1f}M params): {t_peer * 1e3:8.1f} ms/step  {batch / t_peer:8.2f} img/s")
    print(f"RESULT model_step ratio={t_peer / t_ours:.2f} target>=1.0")


if __name__ == "__main__":
    main()
