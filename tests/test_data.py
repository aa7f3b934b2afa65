"""Training data on disk: shards read in place, sample decoding, bad-sample accounting, the resumable sampler."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clear.data import (
    BadSample,
    BadSampleError,
    BadSamples,
    DistillDataset,
    RankSampler,
    collate,
    default_cache_dir,
    read_image,
    read_prompt,
)
from clear.files import write_tar
from clear.shards import Sample, index_samples, split_key


def jpeg(color=(200, 30, 30), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def t2i_2m_tar(path, n=3):
    """A shard in the layout of text-to-image-2M's data_1024_10K (000000000.jpg + .json with 'prompt' and more)."""
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("jpg", jpeg()), ("json", json.dumps({"prompt": f"prompt {i}", "width": 20}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_split_key():
    assert split_key("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_key("x.seg.PNG") == ("x", "seg.png")
    assert split_key("noext") == ("noext", "")


def test_index_reads_tars_in_place_and_loose_files(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    t2i_2m_tar(root / "data_000000.tar")
    (root / "sub" / "k1.jpg").write_bytes(jpeg())
    (root / "sub" / "k1.json").write_text('{"prompt": "loose"}')
    (root / ".staging").mkdir()
    (root / ".staging" / "hidden.jpg").write_bytes(jpeg())  # hidden folders are not data
    (root / "sub" / "notes.md").write_text("not a sample")

    samples = index_samples(root)
    assert [s.id for s in samples] == ["data_000000/000000000", "data_000000/000000001", "data_000000/000000002",
                                       "sub/k1"]
    assert read_prompt(samples[1]) == "prompt 1"
    assert read_prompt(samples[3]) == "loose"
    assert read_image(samples[0], 8).shape == (3, 8, 8)
    # a single tar is a data root too, ids are its keys
    assert [s.id for s in index_samples(root / "data_000000.tar")] == ["000000000", "000000001", "000000002"]
    assert default_cache_dir(root).name == "data_cache"
    assert default_cache_dir(root / "data_000000.tar") == (root / "data_000000_cache").resolve()


def test_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_samples(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .tar"):
        index_samples(tmp_path / "x.txt")
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="broken.tar is not a readable"):
        index_samples(tmp_path)


def test_write_tar_atomic_round_trip(tmp_path):
    write_tar(tmp_path / "s.tar", [("a", {"jpg": jpeg(), "json": b'{"prompt": "p"}'}), ("b", {"json": b"{}"})])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]  # no temporary file left
    ids = {s.id: s for s in index_samples(tmp_path / "s.tar")}
    assert set(ids) == {"a", "b"} and read_prompt(ids["a"]) == "p"


def test_image_preprocessing_resizes_shorter_side_and_centre_crops():
    im = Image.fromarray(np.concatenate([np.zeros((10, 10, 3), np.uint8), np.full((10, 20, 3), 255, np.uint8)], 1))
    from clear.data import image_to_tensor

    x = image_to_tensor(im, 10)  # 30x10, black left third: the centre crop (columns 10..19) is all white
    assert x.shape == (3, 10, 10) and torch.equal(x, torch.ones(3, 10, 10))
    y = image_to_tensor(im, 20)  # upscaled to 60x20, crop columns 20..39: white but for bicubic ringing at the edge
    assert y.shape == (3, 20, 20) and torch.allclose(y[:, :, 2:], torch.ones(3, 20, 18))
    z = image_to_tensor(im.transpose(Image.Transpose.ROTATE_90), 10)  # tall image: crop rows
    assert z.shape == (3, 10, 10) and torch.equal(z, torch.ones(3, 10, 10))


def test_bad_samples_are_reported_not_replaced(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for key, img, meta in [("good", jpeg(), b'{"prompt": "ok"}'),
                           ("badimg", b"\xff\xd8 not a jpeg", b'{"prompt": "ok"}'), ("badjson", jpeg(), b'{"prompt": '),
                           ("noprompt", jpeg(), b'{"caption": "x"}')]:
        (root / f"{key}.jpg").write_bytes(img)
        (root / f"{key}.json").write_bytes(meta)
    (root / "nojson.jpg").write_bytes(jpeg())
    ds = DistillDataset(index_samples(root), resolution=8)
    items = {s.id: ds[i] for i, s in enumerate(ds.samples)}
    assert not isinstance(items["good"], BadSample)
    assert items["badimg"].kind == "bad image"
    assert items["badjson"].kind == "bad json"
    assert items["noprompt"].kind == "bad json"
    assert items["nojson"].kind == "no json"

    batch = collate([items["good"], items["badimg"], items["badjson"]])
    assert batch["ids"] == ["good"] and batch["image"].shape == (1, 3, 8, 8) and batch["prompt"] == ["ok"]
    assert [b.id for b in batch["bad"]] == ["badimg", "badjson"]
    empty = collate([items["badimg"]])
    assert empty["ids"] == [] and len(empty["bad"]) == 1

    bad = BadSamples()
    bad.add(batch["bad"])
    bad.add(items["nojson"])
    assert len(bad) == 3 and bad.counts() == {"bad image": 1, "bad json": 1, "no json": 1}
    assert "badimg" in bad.report() and "skipped 3" in bad.report()
    restored = BadSamples()
    restored.load_state_dict(json.loads(json.dumps(bad.state_dict())))
    assert restored.items == bad.items


def test_cached_features_missing_or_corrupt(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (root / "a.json").write_text('{"prompt": "x"}')
    cache = tmp_path / "cache"
    ds = DistillDataset(index_samples(root), 8, cache_dir=cache, cached_prompts=True)
    assert ds[0].kind == "not cached"
    (cache / "prompt_embeds").mkdir(parents=True)
    (cache / "prompt_embeds" / "a.safetensors").write_bytes(b"truncated")
    assert ds[0].kind == "bad cache"
    with pytest.raises(BadSampleError, match="no json"):
        read_prompt(Sample("z", {}))


def test_collate_refuses_mixed_shapes():
    items = [{"id": "a", "latent_mean": torch.zeros(4, 2, 2)}, {"id": "b", "latent_mean": torch.zeros(4, 4, 4)}]
    with pytest.raises(ValueError, match="different shapes"):
        collate(items)


def test_rank_sampler_resumes_and_splits():
    n = 7
    full = RankSampler(n, seed=3)
    stream = [i for _, i in zip(range(20), iter(full))]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))  # epochs are permutations
    assert stream[:7] != stream[7:14]  # and reshuffled
    resumed = [i for _, i in zip(range(11), iter(RankSampler(n, seed=3, start=9)))]
    assert resumed == stream[9:20]
    r0, r1 = RankSampler(n, 3, 0, 2), RankSampler(n, 3, 1, 2)
    e0, e1 = r0.epoch_indices(0), r1.epoch_indices(0)
    assert len(e0) == len(e1) == 3 and not set(e0) & set(e1)
    with pytest.raises(ValueError, match="cannot be split"):
        RankSampler(1, world_size=2)


def test_bad_samples_state_stays_one_entry_per_file():
    bad = BadSamples()
    first = [BadSample("a", "bad image: x"), BadSample("b", "bad json: y")]
    assert bad.add(first) == first and bad.add(BadSample("a", "bad image: x")) == [] and bad.add(first) == []
    assert len(bad) == 2 and bad.encounters == 5 and bad.state_dict()["items"] == [["a", "bad image: x"],
                                                                                   ["b", "bad json: y"]]
    old = BadSamples()  # a checkpoint written before the count was per file lists every encounter
    old.load_state_dict({"items": [["a", "bad image: x"], ["a", "bad image: x"], ["b", "bad json: y"]]})
    assert old.ids() == ["a", "b"] and old.encounters == 3


# ------------------------------------------------------------------------------------------
# path traversal: member names from a shard or a folder never lead outside
# ------------------------------------------------------------------------------------------

def crafted_tar(path, members):
    """A tar of ``members``: ``[(name, bytes)]`` for files, ``[(name, ("symlink"|"hardlink", target))]`` for links."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


UNSAFE_MEMBERS = {
    "dotdot": ("../../x/victim.jpg", "a '..' component"),
    "absolute": ("/tmp/x/victim.jpg", "an absolute path"),
    "symlink": ("victim.jpg", "a link"),
    "hardlink": ("victim.jpg", "a link"),
}


@pytest.mark.parametrize("case", UNSAFE_MEMBERS)
def test_a_shard_with_an_unsafe_member_is_refused_naming_it(tmp_path, case):
    name, why = UNSAFE_MEMBERS[case]
    data = {"symlink": ("symlink", "../../../etc/passwd"), "hardlink": ("hardlink", "/etc/passwd")}.get(case, jpeg())
    root = tmp_path / "data"
    root.mkdir()
    shard = crafted_tar(root / "evil.tar", [("000.jpg", jpeg()), ("000.json", b'{"prompt": "ok"}'), (name, data),
                                            ("victim.json", b'{"prompt": "x"}')])
    for where in (root, shard):  # a folder of shards, or the shard itself as the data root
        with pytest.raises(ValueError) as e:
            index_samples(where)
        message = str(e.value)
        assert message.startswith(f"{shard}: member {name!r} is {why}") and "\n" not in message, message
        assert "remove the shard" in message


def test_only_expected_suffixes_are_samples(tmp_path):
    crafted_tar(tmp_path / "s.tar", [("a.jpg", jpeg()), ("a.json", b'{"prompt": "p"}'), ("a.py", b"print(1)"),
                                     ("b.safetensors", b"x"), ("./c.png", jpeg())])
    samples = index_samples(tmp_path / "s.tar")
    assert [(s.id, sorted(s.files)) for s in samples] == [("a", ["jpg", "json"]), ("c", ["png"])]


def test_a_loose_link_out_of_the_data_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg())
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (root / "inside.jpg").symlink_to(root / "a.jpg")  # a link within the root is fine
    assert [s.id for s in index_samples(root)] == ["a", "inside"]
    (root / "b.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(ValueError, match=r"^\S+/data/b.jpg is a link to \S+/outside/secret.jpg, outside the data root"):
        index_samples(root)


def test_feature_paths_stay_in_the_cache(tmp_path):
    from clear.data import PROMPT_EMBEDS, feature_path, write_feature_cache

    cache = tmp_path / "deep" / "cache"
    assert feature_path(cache, PROMPT_EMBEDS, "shard/000") == cache / PROMPT_EMBEDS / "shard/000.safetensors"
    for bad in ("../../../victim", "/tmp/victim", "shard/../../../victim", ""):
        with pytest.raises(ValueError, match="cannot be a cache file name"):
            feature_path(cache, PROMPT_EMBEDS, bad)
    samples = [Sample("../../../victim", {"json": None})]
    with pytest.raises(ValueError, match="cannot be a cache file name"):
        write_feature_cache(samples, PROMPT_EMBEDS, cache, read=lambda s: "p",
                            encode=lambda xs: {"prompt_embeds": torch.zeros(len(xs), 2)}, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_cache_scripts_refuse_a_crafted_shard_and_write_nothing(tmp_path, tiny_flux_pipeline_dir):
    from scripts_loader import load_script

    root = tmp_path / "a" / "b" / "data"
    root.mkdir(parents=True)
    escape = "../../../../x/victim"  # from <cache>/<kind>/evil/: out of the cache, next to the data's parent
    shard = crafted_tar(root / "evil.tar", [(f"{escape}.jpg", jpeg()), (f"{escape}.json", b'{"prompt": "p"}')])
    for script, extra in (("cache_prompt_embeds", []), ("cache_latent_codes", ["--resolution", "16"])):
        with pytest.raises(SystemExit) as e:
            load_script(script).main(["--pretrained_model_name_or_path", str(tiny_flux_pipeline_dir),
                                      "--data_root", str(root), *extra])
        assert str(e.value.code).startswith(f"{shard}: member '{escape}.jpg' is a '..' component")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_non_finite_cached_feature_is_a_bad_sample_named(tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "d"
    root.mkdir()
    for key in ("a", "b", "c"):
        (root / f"{key}.json").write_text('{"prompt": "x"}')
    cache = tmp_path / "cache"
    (cache / "latent_codes").mkdir(parents=True)
    good = {"latent_mean": torch.zeros(4, 2, 2), "latent_std": torch.ones(4, 2, 2)}
    save_file(good, cache / "latent_codes" / "a.safetensors")
    save_file(dict(good, latent_mean=torch.full((4, 2, 2), float("nan"))), cache / "latent_codes" / "b.safetensors")
    save_file(dict(good, latent_std=torch.full((4, 2, 2), float("inf"))), cache / "latent_codes" / "c.safetensors")
    ds = DistillDataset(index_samples(root), 8, cache_dir=cache, cached_latents=True)
    assert not isinstance(ds[0], BadSample)
    for i, name in ((1, "latent_mean"), (2, "latent_std")):
        assert isinstance(ds[i], BadSample) and ds[i].kind == "bad cache"
        assert ds[i].reason == (f"bad cache: {cache / 'latent_codes' / ds.samples[i].id}.safetensors holds "
                                f"16 NaN or infinite values in {name}; delete it and re-run the cache script")


def test_cache_and_training_scripts_refuse_zero_text_tokens(tmp_path, tiny_flux_pipeline_dir):
    """--max_sequence_length 0 used to become the model's default without a word."""
    from scripts_loader import load_script

    (tmp_path / "a.json").write_text('{"prompt": "x"}')
    argv = ["--pretrained_model_name_or_path", str(tiny_flux_pipeline_dir), "--data_root", str(tmp_path),
            "--max_sequence_length", "0"]
    want = "max_sequence_length=0: the number of text tokens must be a whole number >= 1"
    with pytest.raises(SystemExit, match=want):
        load_script("cache_prompt_embeds").main(argv)
    with pytest.raises(SystemExit, match=want):
        load_script("distill").main([*argv, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("*.safetensors"))
