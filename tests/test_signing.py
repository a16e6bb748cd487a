"""Signed summaries (issue 28, item 7): a signature made with a key the editor lacks detects
an edit the SHA-256 digests cannot (an attacker recomputes those); HMAC-SHA256 and Ed25519,
torch files, JAX folders and adapter folders; verified at load when a key is given."""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

import optax_selective as osel  # noqa: E402
import torch_bridge  # noqa: E402
from torch_bridge.summary import _digest, _param_head  # noqa: E402

SECRET = b"a shared secret, 32 bytes long.."
PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {"hmac": (SECRET, SECRET), "ed25519": (PRIVATE, PRIVATE.public_key())}


def torch_summary(tmp_path, sign_key=None):
    model = torch.nn.Linear(3, 2)
    masks = [torch.tensor([[True, False, True], [False, False, False]]), torch.tensor([True, False])]
    s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
    path = tmp_path / "summary.safetensors"
    torch_bridge.write_summary_to_disk(path, s, key=sign_key)
    return model, path


def edit_values_and_redigest(path):
    """What an attacker without the key can do: change values and recompute every digest."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["optax_selective"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["params/weight/values"] = torch.full_like(tensors["params/weight/values"], 1e4)
    for e in meta["params"]:
        pre = f"params/{e['name']}/"
        entry = {**e, "indices": tensors[pre + "indices"], "values": tensors[pre + "values"]}
        e["sha256"] = _digest(_param_head(e["name"], entry), entry["indices"], entry["values"])
    path.write_bytes(safetensors.torch.save(tensors, metadata={
        "format": "optax_selective.torch_summary", "optax_selective": json.dumps(meta)}))


@pytest.mark.parametrize("kind", KEYS)
def test_a_signed_torch_summary_refuses_an_edit_the_digests_miss(tmp_path, kind):
    signer, verifier = KEYS[kind]
    _, path = torch_summary(tmp_path, sign_key=signer)
    assert torch_bridge.load_summary_from_disk(path, key=verifier).budget_used == 3
    edit_values_and_redigest(path)
    assert torch_bridge.load_summary_from_disk(path).budget_used == 3  # digests still match
    with pytest.raises(osel.SignatureError, match="changed after it was signed"):
        torch_bridge.load_summary_from_disk(path, key=verifier)


def test_wrong_key_missing_signature_and_key_kinds_are_refused(tmp_path):
    _, path = torch_summary(tmp_path, sign_key=SECRET)
    with pytest.raises(osel.SignatureError, match="not signed with this key"):
        torch_bridge.load_summary_from_disk(path, key=b"another secret of 16+ bytes")
    with pytest.raises(osel.SignatureError, match="'hmac-sha256' signature, the key given is"):
        torch_bridge.load_summary_from_disk(path, key=PRIVATE.public_key())
    (tmp_path / "u").mkdir()
    _, unsigned = torch_summary(tmp_path / "u")
    with pytest.raises(osel.SignatureError, match="has no signature"):
        torch_bridge.load_summary_from_disk(unsigned, key=SECRET)
    with pytest.raises(TypeError, match="only verifies"):
        osel.sign(unsigned, PRIVATE.public_key())
    with pytest.raises(ValueError, match="at least 16 bytes"):
        osel.sign(unsigned, b"short")
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    osel.sign(unsigned, other)
    with pytest.raises(osel.SignatureError, match="not signed with this key"):
        osel.verify_signature(unsigned, PRIVATE.public_key())


@pytest.mark.parametrize("kind", KEYS)
def test_a_signed_jax_summary_folder(tmp_path, kind):
    signer, verifier = KEYS[kind]
    params = {"w": jnp.array([3.0, -0.1, 0.2, 5.0])}
    state = osel.selective_pafi(budget=2).init(params)
    path = tmp_path / "jax_summary"
    osel.save_summary(path, osel.make_summary(params, state), key=signer)
    assert osel.load_summary(path, key=verifier).budget_used == 2
    # any file of the folder changed, added or removed is refused
    files = sorted(p for p in path.rglob("*") if p.is_file())
    victim = files[0]
    original = victim.read_bytes()
    victim.write_bytes(original + b" ")
    with pytest.raises(osel.SignatureError, match="changed after it was signed"):
        osel.load_summary(path, key=verifier)
    victim.write_bytes(original)
    (path / "extra.json").write_text("{}")
    with pytest.raises(osel.SignatureError, match="added after it was signed"):
        osel.load_summary(path, key=verifier)
    (path / "extra.json").unlink()
    assert osel.load_summary(path, key=verifier).budget_used == 2


def test_an_adapter_folder_signs_over_its_files(tmp_path):
    model, _ = torch_summary(tmp_path)
    masks = [torch.tensor([[True, False, True], [False, False, False]]), torch.tensor([True, False])]
    s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
    folder = tmp_path / "adapter"
    torch_bridge.adapters.save_pretrained(s, folder)
    sig = osel.sign(folder, PRIVATE)
    assert sig == str(folder) + ".sig"
    osel.verify_signature(folder, PRIVATE.public_key())
    victim = sorted(p for p in folder.rglob("*") if p.is_file())[-1]
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(osel.SignatureError, match="changed after it was signed"):
        osel.verify_signature(folder, PRIVATE.public_key())
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(osel.SignatureError, match="symbolic link|not a regular file"):
        osel.verify_signature(folder, PRIVATE.public_key())
