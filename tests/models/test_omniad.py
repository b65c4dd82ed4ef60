"""Omni-AD: trains on synthetic data and separates defects (through models.train), the attention
against torch's SDPA, a trained (not rebuilt) FFN, ONNX (dynamo) == PyTorch, checkpoint round trip."""
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import models
from models import omniad as O
from models.checkpoint import load_checkpoint, save_checkpoint
from models.data import make_datasets
from models.synthetic import generate_dataset
from models.train import predict, train
from tests.models.onnx_parity import assert_onnx_matches_pytorch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("syn"), classes=("texture",), n_train=16,
                            n_test_good=8, n_test_defect=8, size=128, seed=0)
    cfg = O.OmniADConfig.tiny(input_size=128).to_dict()
    torch.manual_seed(0)
    net, summary = train(root, model="omniad", epochs=30, batch_size=8, config=cfg, progress=False,
                         log=lambda m: None)
    return root, net, summary


def test_trains_and_separates_defects(trained):
    root, net, summary = trained
    assert summary["feature_cache"]            # the frozen-encoder fast path of models.train
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    _, _, test_ds, _ = make_datasets(root, preprocess=net.preprocess)
    p = predict(net, torch.utils.data.DataLoader(test_ds, batch_size=16))
    auc = roc_auc_score(p["labels"], p["scores"])
    assert auc >= 0.85, auc


@pytest.mark.parametrize("nq,nk,heads", [(7, 5, 1), (33, 9, 2), (4, 16, 4)])
def test_attention_matches_sdpa(nq, nk, heads):
    g = torch.Generator().manual_seed(nq)
    q, k, v = (torch.randn(3, n, 8 * heads, generator=g) for n in (nq, nk, nk))
    ref = F.scaled_dot_product_attention(
        q.view(3, nq, heads, 8).transpose(1, 2), k.view(3, nk, heads, 8).transpose(1, 2),
        v.view(3, nk, heads, 8).transpose(1, 2)).transpose(1, 2).reshape(3, nq, 8 * heads)
    torch.testing.assert_close(O._attend(q, k, v, heads), ref, rtol=1e-5, atol=1e-5)


def test_global_branch_matches_explicit_two_step_reference():
    torch.manual_seed(1)
    gb = O.GlobalBranch(dim=8, heads=2, num_queries=4, num_kv=3, mlp_ratio=2.0).eval()
    x = torch.randn(2, 8, 5, 7)                 # odd sizes
    with torch.no_grad():
        out = gb(x)
        # reference: torch.nn.MultiheadAttention-free, per-sample, written from the definition
        ref = []
        for b in range(2):
            t = x[b].flatten(1).T                                            # (HW, C)
            tn = gb.norm1(t)
            q = gb.q1(gb.queries)
            k, v = gb.kv1(tn).chunk(2, dim=-1)
            heads = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                a = torch.softmax(q[:, sl] @ k[:, sl].T / 2.0, dim=-1)
                heads.append(a @ v[:, sl])
            gtok = gb.proj1(torch.cat(heads, dim=1))                         # (4, C)
            grid = gtok.T.reshape(1, 8, 2, 2)
            t = t + F.interpolate(grid, size=(5, 7), mode="bilinear", align_corners=False)[0].flatten(1).T
            q2 = gb.q2(gb.norm2(t))
            heads = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                a = torch.softmax(q2[:, sl] @ gb.keys[:, sl].T / 2.0, dim=-1)
                heads.append(a @ gb.values[:, sl])
            t = t + gb.proj2(torch.cat(heads, dim=1))
            t = t + gb.ffn(gb.norm3(t))
            ref.append(t.T.reshape(8, 5, 7))
    torch.testing.assert_close(out, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_ffn_is_a_trained_module_and_forward_is_deterministic(trained):
    _, net, _ = trained
    ffns = [m.glob.ffn for m in net.modules() if isinstance(m, O.OmniBlock)]
    assert ffns and all(any(p.requires_grad for p in f.parameters()) for f in ffns)
    names = {n for n, _ in net.named_parameters()}
    assert any(".glob.ffn.0.weight" in n for n in names)          # saved in state_dict / optimised
    fresh = models.create_model("omniad", pretrained=False, **net.config.to_dict())
    # training moved the FFN weights away from their initialisation
    assert not torch.allclose(fresh.stages[0][0].glob.ffn[0].weight, net.stages[0][0].glob.ffn[0].weight)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a1, s1 = net(x)
        a2, s2 = net(x)
    assert torch.equal(a1, a2) and torch.equal(s1, s2)
    # gradients reach the FFN and nothing reaches the frozen encoder
    net.train()
    loss = net.training_loss(x)
    loss.backward()
    assert net.stages[1][0].glob.ffn[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.encoder.parameters())
    net.zero_grad(set_to_none=True)
    net.eval()


def test_jitter_only_in_training_and_scaled():
    torch.manual_seed(0)
    net = models.create_model("omniad", pretrained=False, **O.OmniADConfig.tiny(jitter_scale=0.5).to_dict())
    z = torch.randn(4, 64, 3, 3) * 3
    d = net._jitter(z) - z
    rms = z.pow(2).mean(1, keepdim=True).sqrt()
    ratio = (d / rms).std().item()
    assert 0.4 < ratio < 0.6, ratio


def test_paper_preset_depths():
    c = O.OmniADConfig.paper()
    assert tuple(c.depths) == (3, 9, 9, 7) and c.heads == 8 and c.num_queries == 64 and c.num_kv == 64
    net = models.create_model("omniad", pretrained=False, **c.to_dict())
    assert [len(s) for s in net.stages] == [3, 9, 9, 7]
    with pytest.raises(ValueError, match="num_queries"):
        O.OmniADConfig(num_queries=10)


def test_onnx_export_matches_pytorch(trained, tmp_path):
    _, net, _ = trained
    assert_onnx_matches_pytorch(net, tmp_path / "omniad.onnx")


def test_checkpoint_round_trip(trained, tmp_path):
    _, net, _ = trained
    path = save_checkpoint(net, tmp_path / "model.pt")
    back = load_checkpoint(path)
    assert back.config == net.config and back.score_stats == net.score_stats
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(net(x), back(x)):
            torch.testing.assert_close(a, b)
