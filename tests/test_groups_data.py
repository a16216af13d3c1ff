"""Group data: a CelebA folder and generated folders written here load with the right labels,
groups and sources; the offline group benchmark's groups and the generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustfair.config import DataConfig
from robustfair.data import ArrayData, DataBundle, load_data
from robustfair.data.generated import celeba_folder_name, load_group_folders, parse_celeba_folder
from robustfair.data.group_benchmark import apply_group_look, assign_groups
from robustfair.errors import UserError
from robustfair.generate import GroupGaussianGenerator, generate_folders

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
         "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
         "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
         "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
         "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
         "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
         "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
         "Wearing_Necktie", "Young"]


def _write_celeba(root, n: int = 12) -> np.ndarray:
    """A CelebA-format folder of n 22×18 images; returns the attribute values in {0, 1}."""
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True)
    values = rng.integers(0, 2, (n, 40))
    lines = [str(n), " ".join(ATTRS)]
    parts = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        arr = np.full((22, 18, 3), 10 * i, dtype=np.uint8)
        Image.fromarray(arr).save(root / "img_align_celeba" / name, quality=100)
        lines.append(name + "  " + " ".join("1" if v else "-1" for v in values[i]))
        parts.append(f"{name} {0 if i < 6 else (1 if i < 9 else 2)}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return values


def _write_generated(root) -> dict[str, int]:
    folders = {"old_male_nosmile_glasses_blackhair": 3, "young_female_smile_noglasses_blondhair": 4,
               "young_male_nosmile_noglasses_otherhair": 5}
    for name, k in folders.items():
        (root / name).mkdir(parents=True)
        for j in range(k):
            Image.fromarray(np.full((40, 40, 3), 7 * j, np.uint8)).save(root / name / f"{j}.png")
    (root / "not_a_celeba_folder").mkdir()
    return folders


def test_celeba_folder_loads_labels_groups_and_splits(tmp_path) -> None:
    values = _write_celeba(tmp_path / "celeba")
    young, male = values[:, ATTRS.index("Young")], values[:, ATTRS.index("Male")]
    cfg = DataConfig(name="celeba", root=str(tmp_path), params={"size": 16, "workers": 1})
    b = load_data(cfg)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 3, 3)
    assert b.train.x.shape == (6, 3, 16, 16) and b.train.x.dtype == torch.uint8
    assert b.train.y.tolist() == young[:6].tolist()
    assert b.train.group.tolist() == male[:6].tolist()
    assert b.test.y.tolist() == young[9:].tolist()
    assert b.class_names == ["old", "young"] and b.group_names == ["female", "male"]
    assert b.train.source.tolist() == [0] * 6
    assert b.mean == (0.485, 0.456, 0.406)
    # the image is resized (shorter side 16) and centre-cropped: a flat colour stays that colour
    assert int(b.train.x[3].float().mean().round()) == 30
    # combined age × gender group and the 3-class hair label
    cfg = DataConfig(name="celeba", root=str(tmp_path / "celeba"),
                     params={"y": "haircolors", "z": "agegender", "size": 16, "workers": 1})
    b = load_data(cfg)
    assert b.train.group.tolist() == (2 * young[:6] + male[:6]).tolist()
    black, blond = values[:6, 8], values[:6, 9]
    assert b.train.y.tolist() == np.where(black == 1, 0, np.where(blond == 1, 1, 2)).tolist()
    assert b.group_names == ["old-female", "old-male", "young-female", "young-male"]
    assert b.num_classes == 3


def test_celeba_with_generated_folders_in_the_papers_naming(tmp_path) -> None:
    _write_celeba(tmp_path / "real")
    folders = _write_generated(tmp_path / "gen")
    cfg = DataConfig(name="celeba", root=str(tmp_path / "real"), params={
        "size": 16, "workers": 1, "generated": str(tmp_path / "gen"), "gen_val": 4})
    b = load_data(cfg)
    gen_train = b.train.subset(torch.nonzero(b.train.source == 1).flatten())
    gen_val = b.extra["gen_val"]
    assert len(gen_train) == sum(folders.values()) - 4 and len(gen_val) == 4
    assert gen_val.source.tolist() == [1] * 4
    both = gen_train.concat(gen_val)
    # y = age (old 0, young 1), z = gender (female 0, male 1), per folder
    pairs = sorted(zip(both.y.tolist(), both.group.tolist(), strict=True))
    assert pairs == sorted([(0, 1)] * 3 + [(1, 0)] * 4 + [(1, 1)] * 5)
    assert b.train.x.shape[1:] == (3, 16, 16)
    # the hold-out is the paper's: numpy seed 0, choice without replacement, over sorted files
    again = load_data(cfg).extra["gen_val"]
    assert torch.equal(again.x, gen_val.x)
    with pytest.raises(UserError, match="attribute"):
        load_data(DataConfig(name="celeba", root=str(tmp_path / "real"), params={
            "z": "Bald", "workers": 1, "size": 16, "generated": str(tmp_path / "gen")}))


def test_celeba_folder_names_round_trip() -> None:
    name = "old_male_nosmile_glasses_blackhair"
    v = parse_celeba_folder(name)
    assert v == {"age": 0, "gender": 1, "smiling": 0, "glasses": 1, "haircolors": 0}
    assert celeba_folder_name(0, 1, 0, 1, 0) == name
    with pytest.raises(ValueError):
        parse_celeba_folder("old_male")


def test_celeba_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(UserError, match="data.root"):
        load_data(DataConfig(name="celeba"))
    _write_celeba(tmp_path / "c")
    with pytest.raises(UserError, match="data.params.y"):
        load_data(DataConfig(name="celeba", root=str(tmp_path / "c"), params={"y": "Nope"}))
    with pytest.raises(UserError, match="data.params"):
        load_data(DataConfig(name="celeba", root=str(tmp_path / "c"), params={"sise": 3}))


def _small_group_bundle(digits) -> DataBundle:
    y = (digits.train.y >= 5).long()
    z = assign_groups(y, 0.2, 0)
    train = ArrayData(apply_group_look(digits.train.x, z, "invert"), y, z, torch.zeros_like(y))
    return DataBundle("digits-groups", train, train, train, 2, (0.5,), (0.5,), "none",
                      ["small", "large"], ["plain", "inverted"])


def test_generated_folders_written_by_the_generator_load_back(digits, tmp_path) -> None:
    bundle = _small_group_bundle(digits)
    info = generate_folders(tmp_path / "gen", bundle, per_cell=6, quality=1.0, components=8,
                            modes=2, seed=3)
    assert info["counts"] == {"small_plain": 6, "small_inverted": 6, "large_plain": 6,
                              "large_inverted": 6}
    assert json.loads((tmp_path / "gen" / "generator.json").read_text())["per_cell"] == 6
    d = load_group_folders(tmp_path / "gen", bundle.class_names, bundle.group_names, 1)
    assert d.y.tolist() == [0] * 12 + [1] * 12
    assert d.group.tolist() == ([0] * 6 + [1] * 6) * 2
    assert d.source.tolist() == [1] * 24
    # PNG is lossless: the folders hold exactly the generator's samples
    gen = GroupGaussianGenerator.fit(bundle.train, 2, 2, 8, 2, 3)
    assert torch.equal(d.x, gen.sample_all(6, 1.0, 3).x)
    with pytest.raises(UserError, match="not empty"):
        generate_folders(tmp_path / "gen", bundle, per_cell=2)


def test_generator_quality_knob_blurs_the_label(digits) -> None:
    bundle = _small_group_bundle(digits)
    gen = GroupGaussianGenerator.fit(bundle.train, 2, 2, 16, 2, 0)
    real = bundle.train
    mean = {y: real.images()[(real.y == y) & (real.group == 0)].mean(0) for y in (0, 1)}

    def closer_to_own_label(q: float) -> float:
        x = gen.sample(0, 0, 200, q, torch.Generator().manual_seed(1)).float() / 255
        d0 = (x - mean[0]).flatten(1).norm(dim=1)
        d1 = (x - mean[1]).flatten(1).norm(dim=1)
        return float((d0 < d1).float().mean())

    good, poor = closer_to_own_label(1.0), closer_to_own_label(0.2)
    assert good > 0.8 and poor < good - 0.3


def test_group_benchmark_groups_are_uneven_within_labels_and_visible() -> None:
    y = torch.tensor([0, 1] * 5000)
    z = assign_groups(y, 0.1, 0)
    share = [float((z[y == c] != c % 2).float().mean()) for c in (0, 1)]
    assert share == [pytest.approx(0.1, abs=0.02)] * 2
    x = torch.zeros(2, 1, 5, 5, dtype=torch.uint8)
    x[:, :, 2, 2] = 200
    g = torch.tensor([0, 1])
    assert apply_group_look(x, g, "invert")[1, 0, 0, 0] == 255
    assert apply_group_look(x, g, "invert")[0, 0, 0, 0] == 0
    assert int((apply_group_look(x, g, "thick")[1] > 0).sum()) == 9
    tint = apply_group_look(x, g, "tint")
    assert tint.shape == (2, 3, 5, 5) and tint[1, 1, 2, 2] == 60 and tint[0, 1, 2, 2] == 200


def test_fairbatch_synthetic_has_a_correlated_group() -> None:
    b = load_data(DataConfig(name="fairbatch-synthetic"))
    assert (len(b.train), len(b.val), len(b.test)) == (2000, 200, 1000)
    assert b.train.x.shape == (2000, 3, 1, 1)
    assert torch.equal(b.train.x[:, 2, 0, 0].long(), b.train.group)
    y, z = b.train.y, b.train.group
    p1, p0 = float(z[y == 1].float().mean()), float(z[y == 0].float().mean())
    assert p1 > p0 + 0.2


@pytest.mark.slow
def test_resnet50_loads_a_local_imagenet_file_except_fc(tmp_path) -> None:
    from torchvision.models import resnet50

    from robustfair.models import build_model
    from robustfair.samplers.drfairness import last_linear

    src = resnet50(weights=None)
    torch.save(src.state_dict(), tmp_path / "r50.pth")
    m = build_model("resnet50", 3, 2, 16, (0.5,) * 3, (0.5,) * 3,
                    weights=str(tmp_path / "r50.pth"), resize=32)
    assert torch.equal(m.net.body.conv1.weight, src.conv1.weight)
    assert last_linear(m) is m.net.body.fc and m.net.body.fc.out_features == 2
    m.eval()
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 2)
    with pytest.raises(UserError, match="weights"):
        build_model("resnet50", 3, 2, 16, weights=str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_generate_command_writes_folders_the_benchmark_loads(tmp_path) -> None:
    from click.testing import CliRunner

    from robustfair.cli import cli

    out = tmp_path / "gen"
    res = CliRunner().invoke(cli, ["generate", str(out), "--per-cell", "5", "--quality", "0.5",
                                   "--components", "8", "--modes", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert "large_inverted: 5" in res.output
    b = load_data(DataConfig(name="mnist5k-groups", params={"generated": str(out),
                                                            "gen_val": 4}))
    assert len(b.extra["gen_val"]) == 4
    assert int((b.train.source == 1).sum()) == 16
    gen = b.train.subset(torch.nonzero(b.train.source == 1).flatten()).concat(b.extra["gen_val"])
    assert torch.bincount(gen.y * 2 + gen.group, minlength=4).tolist() == [5] * 4
