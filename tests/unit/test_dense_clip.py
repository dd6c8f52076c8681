"""Training-free dense CLIP features (segclip/eval/dense_clip.py): `plain` against open_clip's
own forward, each method's last block against a hand computation on a 1-head width-4 block,
each method with its modifications off against `plain`, shapes at an untrained input size and
the positional-embedding interpolation."""

import copy

import numpy as np
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from segclip.config import load_config
from segclip.eval.dense_clip import (
    DENSE_METHODS,
    dense_features,
    interpolate_positional_embedding,
    neighbourhood_bias,
)
from segclip.model import build_model

MODIFIED = [name for name in DENSE_METHODS if name != "plain"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model runs fastest on one thread (and far slower on a busy machine with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    model = build_model(load_config("tiny", ["model.pretrained=null"]).model)
    return model.clip.visual.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def plain(visual, images):
    with torch.no_grad():
        return dense_features(visual, images, "plain")


def test_registry_entries_carry_their_name_and_paper():
    assert set(DENSE_METHODS) == {"plain", "maskclip", "sclip", "clearclip", "naclip"}
    for name, method in DENSE_METHODS.items():
        assert method.name == name
        assert method.paper
        assert method.last_block.__doc__


# --- plain is CLIP itself ----------------------------------------------------------------------


@torch.no_grad()
def test_plain_equals_open_clips_own_forward(visual, images, plain):
    twin = copy.deepcopy(visual)
    twin.output_tokens = True
    _, tokens = twin(images)  # tokens: patch tokens after ln_post, before proj
    expected = (tokens @ twin.proj).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    assert plain.shape == (2, 128, 8, 8)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sequence_first_blocks_give_the_same_features(visual, images):
    """Blocks built with batch_first=False get their tokens as (L, B, D)."""
    twin = copy.deepcopy(visual)
    twin.transformer.batch_first = False
    for block in twin.transformer.resblocks:
        block.attn.batch_first = False
    for name in DENSE_METHODS:
        torch.testing.assert_close(
            dense_features(twin, images, name), dense_features(visual, images, name)
        )


# --- each last block by hand on a 1-head, width-4 block with 3 tokens --------------------------

X = np.array([[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, -1.0, 2.0], [2.0, 1.0, 0.0, 1.0]])  # cls, p1, p2
WQ = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, -1]], dtype=float)
WK = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=float)
WV = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=float)
WO = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=float)
BQ = np.array([0.1, 0.0, 0.0, 0.0])
BV = np.array([0.5, 0.0, 0.0, -0.5])
BO = np.array([0.0, 0.25, 0.0, 0.0])
W1 = np.array([[1, -1, 0, 0], [0, 1, -1, 0], [0, 0, 1, -1], [-1, 0, 0, 1]], dtype=float)
W2 = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
LAYER_SCALE = 0.5  # ls_1 and ls_2 multiply their branch by 0.5
S = 4**-0.5  # head_dim ** -0.5
GRID = (1, 2)  # the two patches side by side


def _hand_block() -> ResidualAttentionBlock:
    block = ResidualAttentionBlock(
        4, 1, mlp_ratio=1.0, ls_init_value=LAYER_SCALE, act_layer=nn.ReLU
    ).double()
    with torch.no_grad():
        block.attn.in_proj_weight.copy_(torch.from_numpy(np.concatenate([WQ, WK, WV])))
        block.attn.in_proj_bias.copy_(torch.from_numpy(np.concatenate([BQ, np.zeros(4), BV])))
        block.attn.out_proj.weight.copy_(torch.from_numpy(WO))
        block.attn.out_proj.bias.copy_(torch.from_numpy(BO))
        block.mlp.c_fc.weight.copy_(torch.from_numpy(W1))
        block.mlp.c_fc.bias.zero_()
        block.mlp.c_proj.weight.copy_(torch.from_numpy(W2))
        block.mlp.c_proj.bias.zero_()
    return block.eval()  # ln_1, ln_2: weight 1, bias 0, eps 1e-5


def _layer_norm(t):
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).mean(-1, keepdims=True)
    return (t - mean) / np.sqrt(var + 1e-5)


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


Y = _layer_norm(X)
Q, K, V = Y @ WQ.T + BQ, Y @ WK.T, Y @ WV.T + BV


def _attention(weights):  # ls_1(out_proj(weights @ v))
    return LAYER_SCALE * ((weights @ V) @ WO.T + BO)


def _ffn(z):  # ls_2(mlp(ln_2(z)))
    return LAYER_SCALE * (np.maximum(_layer_norm(z) @ W1.T, 0.0) @ W2.T)


def _plain_by_hand():
    z = X + _attention(_softmax(Q @ K.T * S))
    return z + _ffn(z)


def _maskclip_by_hand():
    z = X + LAYER_SCALE * (V @ WO.T + BO)  # each token's value, no query/key
    return z + _ffn(z)


def _sclip_by_hand():
    z = X + _attention(_softmax(Q @ Q.T * S) + _softmax(K @ K.T * S))  # only the map changes
    return z + _ffn(z)


def _clearclip_by_hand():
    return _attention(_softmax(Q @ Q.T * S))  # no residual, no FFN


def _naclip_by_hand(std):
    e = np.exp(-1.0 / (2 * std**2))  # the two patches are 1 apart; the cls token gets 0
    gaussian = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, e], [0.0, e, 1.0]])
    return _attention(_softmax(K @ K.T * S + gaussian))  # no residual, no FFN


HAND = {
    "plain": ({}, _plain_by_hand()),
    "maskclip": ({}, _maskclip_by_hand()),
    "sclip": ({}, _sclip_by_hand()),
    "clearclip": ({}, _clearclip_by_hand()),
    "naclip": ({}, _naclip_by_hand(5.0)),
    "naclip std=1": ({"std": 1.0}, _naclip_by_hand(1.0)),
}


@pytest.mark.parametrize("case", HAND)
def test_last_block_equals_the_hand_computation(case):
    options, expected = HAND[case]
    method = DENSE_METHODS[case.split()[0]]
    with torch.no_grad():
        out = method.last_block(_hand_block(), torch.from_numpy(X)[None], GRID, **options)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("name", list(DENSE_METHODS))
def test_last_block_with_modifications_off_is_the_plain_block(name):
    with torch.no_grad():
        out = DENSE_METHODS[name].last_block(
            _hand_block(), torch.from_numpy(X)[None], GRID, modified=False
        )
    np.testing.assert_allclose(out[0].numpy(), _plain_by_hand(), atol=1e-10)


def test_the_hand_cases_differ_from_each_other():
    """The hand block separates the methods (a check on the test's own numbers)."""
    outputs = [expected for _, expected in HAND.values()]
    for i in range(len(outputs)):
        for j in range(i):
            assert np.abs(outputs[i] - outputs[j]).max() > 1e-3


def test_neighbourhood_bias_on_a_2x2_grid():
    bias = neighbourhood_bias((2, 2), std=2.0, dtype=torch.float64)
    side, diagonal = np.exp(-1 / 8), np.exp(-2 / 8)  # |p_i - p_j|^2 = 1 or 2, 2 std^2 = 8
    patches = np.array(
        [
            [1, side, side, diagonal],  # (0,0) against (0,0) (0,1) (1,0) (1,1)
            [side, 1, diagonal, side],
            [side, diagonal, 1, side],
            [diagonal, side, side, 1],
        ]
    )
    expected = np.zeros((5, 5))
    expected[1:, 1:] = patches
    np.testing.assert_allclose(bias.numpy(), expected, atol=1e-12)


# --- the tiny model ----------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", MODIFIED)
def test_modifications_off_give_plains_features(visual, images, plain, name):
    off = dense_features(visual, images, name, modified=False)
    assert torch.allclose(off, plain, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", MODIFIED)
def test_each_method_changes_the_features(visual, images, plain, name):
    ours = dense_features(visual, images, name)
    assert torch.isfinite(ours).all()
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()


@torch.no_grad()
def test_naclip_std_matters(visual, images):
    assert not torch.allclose(
        dense_features(visual, images, "naclip", std=1.0),
        dense_features(visual, images, "naclip", std=5.0),
    )


@torch.no_grad()
@pytest.mark.parametrize("name", list(DENSE_METHODS))
def test_shape_at_an_untrained_size(visual, name):
    images = torch.randn(2, 3, 160, 96, generator=torch.Generator().manual_seed(2))
    features = dense_features(visual, images, name)
    assert features.shape == (2, 128, 10, 6)  # embed_dim 128, 160/16 x 96/16
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_positional_embedding_interpolation(visual):
    pos = visual.positional_embedding
    # at the trained grid: the identity
    torch.testing.assert_close(
        interpolate_positional_embedding(visual, visual.grid_size), pos, atol=1e-6, rtol=0
    )
    # elsewhere: the class token's row is kept, a constant grid stays constant
    resized = interpolate_positional_embedding(visual, (10, 6))
    assert resized.shape == (1 + 10 * 6, 128)
    assert torch.equal(resized[0], pos[0])
    grid = pos[1:].reshape(8, 8, 128).permute(2, 0, 1)[None]  # (1, D, 8, 8), row-major patches
    bicubic = torch.nn.functional.interpolate(grid, size=(10, 6), mode="bicubic")
    torch.testing.assert_close(resized[1:], bicubic[0].permute(1, 2, 0).reshape(60, 128))
    twin = copy.deepcopy(visual)
    with torch.no_grad():
        twin.positional_embedding[1:] = torch.linspace(-1, 1, 128)
    constant = interpolate_positional_embedding(twin, (10, 6))[1:]
    torch.testing.assert_close(constant, torch.linspace(-1, 1, 128).expand(60, 128))


def test_bad_inputs_are_refused(visual, images):
    with pytest.raises(ValueError, match="unknown dense method"):
        dense_features(visual, images, "gem")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_features(visual, images[..., :120], "plain")
    with pytest.raises(TypeError):
        dense_features(visual, images, "sclip", temperature=2.0)
