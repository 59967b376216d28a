"""Prompt sources and the text-embedding / VAE-latent cache on a tiny random SDXL pipeline.

Pinned against independent truths: the cached embeddings equal `encode_prompts` of the same
prompts (one call, unpadded), the cached latents equal diffusers' AutoencoderKL.encode posterior
mean times scaling_factor on the same images, a cache written by two processes (two calls with
process indices 1 and 0) holds the rows of one written by one and serves the same global batches,
split per process, as ArraySource would; stale, incomplete, corrupt and truncated caches and bad
prompt files are refused with one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fewstep_jax.data.latent_cache import LATENTS, cache_source, open_latent_cache, part_rows  # noqa: E402
from fewstep_jax.data.prompt_sources import (  # noqa: E402
    prompt_file,
    prompt_list,
    record_source,
    tfds_text_source,
)
from fewstep_jax.data.sources import ArraySource  # noqa: E402
from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.pipelines.encode_cache import open_pipeline_cache, write_latent_cache  # noqa: E402
from fewstep_jax.pipelines.folder import load_pipeline  # noqa: E402
from fewstep_jax.pipelines.prompts import encode_prompts  # noqa: E402
from tests.tiny_pipelines import CORPUS, build_sdxl  # noqa: E402

N = 5  # rows, and rows per encoder call: two writers' 3 + 2 rows are padded batches
B = N  # one batch shape for every call: one compilation of each encoder
SIDE = 16  # pixels: 8 x 8 latents (2 pixels per latent)


class ListContainer:
    """In-memory random-access records (the interface of TFDS's as_data_source)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __getitems__(self, keys):
        return [self.records[k] for k in keys]


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), "caption": CORPUS[i].encode()}
        for i in range(N)
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny SDXL (folder, torch pipeline, JAX pipeline), a prompt file, an image-text source and
    the caches written from them (prompts by one process; image-text by one and by two)."""
    root = tmp_path_factory.mktemp("cache")
    folder, ref = build_sdxl(str(root / "pipe"))
    pipe = load_pipeline(folder)
    txt = root / "prompts.txt"
    txt.write_text("\n".join(CORPUS[:2]) + "\n\n   \n" + "\n".join(CORPUS[2:N]) + "\n")
    prompts = prompt_file(txt)
    images = record_source(ListContainer(_records()), "caption", "image", identity={"name": "tiny"})
    for p in (0, 1):
        write_latent_cache(pipe, prompts, root / "prompts", batch_size=B, process_index=p, process_count=2)
    write_latent_cache(pipe, images, root / "one", batch_size=B)
    return {"root": root, "ref": ref, "pipe": pipe, "txt": txt, "prompts": prompts, "images": images}


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rows(cache) -> dict[str, np.ndarray]:
    records = cache.__getitems__(range(len(cache)))
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def test_embeddings_equal_encode_prompts(env):
    cache = open_pipeline_cache(env["pipe"], env["prompts"], env["root"] / "prompts")
    cond, null = encode_prompts(env["pipe"], CORPUS[:N])
    rows = _rows(cache)
    assert len(cache) == N and not cache.has_latents
    assert sorted(rows) == sorted(cond) == ["pooled", "text_states", "time_ids"]
    for k in cond:
        assert rows[k].shape == cond[k].shape and rows[k].dtype == cond[k].dtype
        assert _err(rows[k], cond[k]) < 1e-6, k
        assert _err(cache.null_condition[k], null[k][:1]) == 0.0, k
    manifest = cache.manifest
    assert manifest["count"] == N and manifest["fingerprint"]["family"] == "sdxl"
    assert manifest["fingerprint"]["source"]["sha256"] == env["prompts"].identity["sha256"]
    assert manifest["info"]["pipeline_folder"] == os.path.abspath(env["pipe"].folder)


def test_latents_equal_the_vae_encoder(env):
    cache = open_pipeline_cache(env["pipe"], env["images"], env["root"] / "one")
    rows = _rows(cache)
    images = np.stack([r["image"] for r in _records()])
    vae = env["ref"].vae
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        ref = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).permute(0, 2, 3, 1).numpy()
    assert rows[LATENTS].shape == (N, SIDE // 2, SIDE // 2, 4)
    assert _err(rows[LATENTS], ref) < 1e-5
    # the size conditions are the images' size; the texts are the captions
    cond, _ = encode_prompts(env["pipe"], CORPUS[:N], image_size=(SIDE, SIDE))
    assert _err(rows["time_ids"], cond["time_ids"]) == 0.0
    assert _err(rows["text_states"], cond["text_states"]) < 1e-6


def test_two_processes_write_the_rows_of_one(env):
    pipe, images, root = env["pipe"], env["images"], env["root"]
    two = root / "two"
    assert part_rows(N, 0, 2) == (0, 3) and part_rows(N, 1, 2) == (3, 5)
    write_latent_cache(pipe, images, two, batch_size=B, process_index=1, process_count=2)
    with pytest.raises(UserError, match=r"no manifest\.json"):
        open_latent_cache(two)
    shutil.rmtree(two / "part-00001-of-00002")  # process 1 not finished
    write_latent_cache(pipe, images, two, batch_size=B, process_index=0, process_count=2)
    with pytest.raises(UserError, match="incomplete: part-00001-of-00002 is missing"):
        open_latent_cache(two)
    assert write_latent_cache(pipe, images, two, batch_size=B, process_index=1, process_count=2)
    # a part already written is not encoded again
    assert not write_latent_cache(pipe, images, two, batch_size=B, process_index=1, process_count=2)
    one, split = open_latent_cache(root / "one"), open_pipeline_cache(pipe, images, two)
    a, b = _rows(one), _rows(split)
    assert sorted(a) == sorted(b)
    for k in a:
        assert _err(a[k], b[k]) < 1e-6, k
    # served per process: the rows of one process's global batch, as ArraySource's
    arrays = {"x": a[LATENTS], **{k: v for k, v in a.items() if k != LATENTS}}
    for step in (0, 3):
        full = cache_source(one, 4, seed=1).batch(step)
        want = ArraySource(arrays, 4, seed=1).batch(step)
        assert _err(full["x"], want["x"]) == 0.0 and _err(full["label"]["pooled"], want["pooled"]) == 0.0
        halves = [cache_source(split, 4, 1, p, 2).batch(step) for p in (0, 1)]
        for k in full["label"]:
            got = np.concatenate([h["label"][k] for h in halves])
            assert _err(got, full["label"][k]) < 1e-6, k
        assert _err(np.concatenate([h["x"] for h in halves]), full["x"]) < 1e-6
    # data-free methods read the condition only
    free = cache_source(one, 4, seed=1, latents=False)
    assert set(free.batch(0)) == {"label"} and set(free.element_spec["label"]) == set(one.condition_keys)
    assert cache_source(one, 4, seed=1).element_spec["x"].shape == (SIDE // 2, SIDE // 2, 4)
    with pytest.raises(UserError, match="has no latents"):
        cache_source(open_latent_cache(root / "prompts"), 4, seed=1, latents=True)


def test_sampled_latents_do_not_depend_on_the_batches(env, tmp_path):
    pipe, images = env["pipe"], env["images"]
    write_latent_cache(pipe, images, tmp_path / "a", latents="sample", seed=3, batch_size=B)
    for p in (0, 1):  # batches [0, 3), [3, 5) instead of [0, 5)
        write_latent_cache(
            pipe,
            images,
            tmp_path / "b",
            latents="sample",
            seed=3,
            batch_size=B,
            process_index=p,
            process_count=2,
        )
    a, b = _rows(open_latent_cache(tmp_path / "a")), _rows(open_latent_cache(tmp_path / "b"))
    mean = _rows(open_latent_cache(env["root"] / "one"))[LATENTS]
    assert _err(a[LATENTS], b[LATENTS]) < 1e-6 and _err(a[LATENTS], mean) > 1e-3
    with pytest.raises(UserError, match=r"stale.*options\.seed"):
        open_pipeline_cache(pipe, images, tmp_path / "a", latents="sample", seed=4)


def test_stale_caches_are_refused(env, tmp_path):
    pipe, root = env["pipe"], env["root"]
    edited = tmp_path / "prompts.txt"
    edited.write_text(env["txt"].read_text().replace("cat", "dog"))
    with pytest.raises(UserError, match=r"stale: .*\(source\.path, source\.sha256 differ\)"):
        open_pipeline_cache(pipe, prompt_file(edited), root / "prompts")
    with pytest.raises(UserError, match=r"stale: .*options\.negative_prompt differ"):
        open_pipeline_cache(pipe, env["prompts"], root / "prompts", negative_prompt="blurry")
    # new text-encoder weights (one bit): the same prompts, another hash (the fingerprint reads
    # the folder's files, so the pipeline need not be loaded again)
    folder = tmp_path / "pipe"
    shutil.copytree(pipe.folder, folder)
    weights = folder / "text_encoder_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    other = dataclasses.replace(pipe, folder=str(folder))
    with pytest.raises(UserError, match=r"stale: .*\(text_sha256 differ\)"):
        open_pipeline_cache(other, env["prompts"], root / "prompts")
    with pytest.raises(UserError, match="holds another cache"):
        write_latent_cache(pipe, prompt_list(["a cat"]), root / "prompts")


def test_corrupt_and_truncated_caches_are_refused(env, tmp_path):
    def broken(edit) -> str:
        dst = tmp_path / f"c{len(os.listdir(tmp_path))}"
        shutil.copytree(env["root"] / "one", dst)
        edit(dst)
        with pytest.raises(UserError) as info:
            open_latent_cache(dst)
        assert "\n" not in str(info.value)
        return str(info.value)

    part = "part-00000-of-00001"

    def truncate(d):
        path = d / part / "text_states.npy"
        path.write_bytes(path.read_bytes()[:-7])

    assert "text_states.npy is truncated" in broken(truncate)
    assert "manifest.json' is corrupt" in broken(lambda d: (d / "manifest.json").write_text('{"format": '))

    def tamper(d):
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["count"] = N + 1
        (d / "manifest.json").write_text(json.dumps(manifest))

    assert "cache_id does not match" in broken(tamper)
    assert "latents.npy is missing" in broken(lambda d: (d / part / "latents.npy").unlink())
    assert "is not a .npy file" in broken(lambda d: (d / part / "pooled.npy").write_bytes(b"garbage" * 20))
    with pytest.raises(UserError, match="not found"):
        open_latent_cache(tmp_path / "nowhere")


def test_prompt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        prompt_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="has no prompts"):
        prompt_file(tmp_path / "blank.txt")
    with pytest.raises(UserError, match=r"expected a \.txt or \.jsonl file"):
        prompt_file(tmp_path / "prompts.csv")
    lines = ['{"caption": "a cat", "id": 1}', "", '{"caption": "a dog"}']
    (tmp_path / "ok.jsonl").write_text("\n".join(lines))
    source = prompt_file(tmp_path / "ok.jsonl")
    assert source.num_rows == 2 and source.read(0, 2) == (["a cat", "a dog"], None)
    (tmp_path / "field.jsonl").write_text("\n".join([*lines, '{"text": "a fox"}']))
    with pytest.raises(UserError, match=r"field\.jsonl:4: no field 'caption' \(the line has \['text'\]\)"):
        prompt_file(tmp_path / "field.jsonl")
    with pytest.raises(UserError, match=r"ok\.jsonl:1: no field 'prompt'"):
        prompt_file(tmp_path / "ok.jsonl", field="prompt")
    (tmp_path / "none.jsonl").write_text('{"id": 1}')
    with pytest.raises(UserError, match=r"none\.jsonl:1: no prompt field"):
        prompt_file(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": ')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not a JSON line"):
        prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text('{"prompt": 3}')
    with pytest.raises(UserError, match=r"num\.jsonl:1: field 'prompt' is int"):
        prompt_file(tmp_path / "num.jsonl")
    source = record_source(ListContainer([{"text": b"a"}, {"txt": "b"}]))
    assert source.read(0, 1) == (["a"], None)
    with pytest.raises(UserError, match="row 1 has no text field 'text'"):
        source.read(0, 2)


@pytest.mark.slow  # TensorFlow's import and a TFDS build: ~10 s
def test_tfds_image_text_source(env, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import types

    records = _records()

    def body(ns: dict) -> None:
        ns["VERSION"] = tfds.core.Version("1.0.0")
        features = {"image": tfds.features.Image(shape=(SIDE, SIDE, 3)), "caption": tfds.features.Text()}
        ns["_info"] = lambda self: tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features)
        )
        ns["_split_generators"] = lambda self, dl_manager: {"train": self._generate_examples()}
        ns["_generate_examples"] = lambda self: ((i, r) for i, r in enumerate(records))

    cls = types.new_class(
        "TinyCaptions", (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body
    )
    cls(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    source = tfds_text_source("tiny_captions", "train", tmp_path, text_key="caption", image_key="image")
    assert source.identity["version"] == "1.0.0" and source.num_rows == N
    texts, images = source.read(0, N)
    by_text = {r["caption"].decode(): r["image"] for r in records}  # TFDS stores its own order
    assert sorted(texts) == sorted(by_text)
    assert all(np.array_equal(image, by_text[t]) for t, image in zip(texts, images))
    write_latent_cache(env["pipe"], source, tmp_path / "cache", batch_size=B)
    rows = _rows(open_pipeline_cache(env["pipe"], source, tmp_path / "cache"))
    one = _rows(open_latent_cache(env["root"] / "one"))
    order = [CORPUS[:N].index(t) for t in texts]
    for k in rows:
        assert _err(rows[k], one[k][order]) < 1e-6, k
    with pytest.raises(UserError, match=r"no text field 'text'; features: \['image', 'caption'\]"):
        tfds_text_source("tiny_captions", "train", tmp_path, text_key="text")
    with pytest.raises(UserError, match="no image field 'img'"):
        tfds_text_source("tiny_captions", "train", tmp_path, image_key="img")
