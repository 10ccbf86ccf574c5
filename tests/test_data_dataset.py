"""The annotation loader (release format and ours) and the region dataset / collate."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dynrefer_core.data.annotations import box_from_segmentation, load_annotations, normalize_caption
from dynrefer_core.data.dataset import RegionDataset, collate_regions, iter_image_batches, tag_target
from dynrefer_core.data.scenes import tag_vocabulary
from dynrefer_core.views.planning import ViewOptions, plan_views_batch


def views(n_views: int = 3, strategy: str = "random", **options) -> ViewOptions:
    return ViewOptions(n_views, strategy, box_rounding="exact", **options)


@pytest.fixture()
def release_file(tmp_path):
    """A tiny file laid out like the release's converted RefCOCOg: RAM indices, absolute image root."""
    root = tmp_path / "coco" / "train2014"
    root.mkdir(parents=True)
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(root / "COCO_1.jpg")
    (tmp_path / "ram_tag_list.txt").write_text("person\nman\n\nshirt\nwhite\nskateboard\n")
    data = {
        "dataset": {"description": "refcocog", "image_root": str(root)},
        "images": [{"id": 1, "file_name": "COCO_1.jpg", "width": 80, "height": 60}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A Man in a white (shirt).", "bbox": [0, 0, 1, 1],
             "segmentation": [[10, 5, 40, 5, 40, 50, 10, 50]],
             "extra_info": {"parser_result": {"tag_set0": [], "tag_set1": [1, 3, 1], "tag_set2": [2, 3]}}},
            {"id": 11, "image_id": 1, "caption": "skateboard", "bbox": [50, 30, 50, 45], "segmentation": [],
             "extra_info": {"parser_result": {"tag_set1": [4], "tag_set2": []},
                            "coco_result": {"category": "skateboard"},
                            "ovad_result": {"att_vec": [1, -1, 0]}}},
        ],
    }
    path = tmp_path / "refcocog_val.json"
    path.write_text(json.dumps(data))
    return path


def test_release_file_resolves_ram_indices_with_the_tag_list(release_file, tmp_path):
    ann = load_annotations(release_file, tag_list=tmp_path / "ram_tag_list.txt")
    r0, r1 = ann.regions
    assert r0.box == (10.0, 5.0, 40.0, 50.0)  # from the polygon, not the bbox field (spec §1.1)
    assert r0.caption == "a man in a white shirt"
    assert r0.tags == ["man", "white", "shirt"]  # set1 + set2 with duplicates removed, in order
    assert r1.box == (50.0, 30.0, 51.0, 45.0)  # empty polygon -> bbox, zero width widened to 1 px
    assert r1.tags == ["skateboard"] and r1.category == "skateboard" and r1.att_vec == [1, -1, 0]
    assert ann.images[1].path == tmp_path / "coco/train2014/COCO_1.jpg"
    assert ann.split("test") is ann  # no split field: the whole file


def test_release_file_without_tag_list_fails_clearly(release_file, tmp_path):
    with pytest.raises(ValueError, match="no tag list was given"):
        load_annotations(release_file)
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="outside the tag list"):
        load_annotations(release_file, tag_list=tmp_path / "short.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_annotations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        load_annotations(tmp_path / "bad.json")


def test_helpers():
    assert normalize_caption('The  "red" Star: left;  of~ it!') == "the red star left of it"
    assert normalize_caption(" ".join(["w"] * 60)).count("w") == 50
    assert box_from_segmentation([3, 4, 9, 4, 9, 4, 3, 4]) == (3.0, 4.0, 9.0, 5.0)
    y = tag_target(["b", "zzz", "a"], {"a": 0, "b": 1, "c": 2})
    assert y.tolist() == [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def mini_data(scenes):
    return load_annotations(scenes)


def test_training_samples_random_views_are_seeded(mini_data):
    train = mini_data.split("train")
    ds = RegionDataset(train, tag_vocabulary(), image_size=56, views=views(3), seed=1)
    s = ds[0]
    assert s.pixel_values.shape == (3, 3, 56, 56) and s.boxes.shape == (3, 4)
    assert s.boxes[0].tolist() == [0.0, 0.0, 56.0, 56.0]  # view 0 is the region itself
    assert s.selected_ts[0] == 0.0 and len(set(s.selected_ts)) == 3
    assert ds[0].selected_ts == s.selected_ts  # same epoch, same views
    ds.set_epoch(1)
    assert any(ds[i].selected_ts != RegionDataset(train, tag_vocabulary(), image_size=56, views=views(3),
                                                  seed=1)[i].selected_ts for i in range(5))
    assert s.tag_target.sum() == len(set(train.regions[0].tags))
    b = collate_regions([ds[0], ds[1]])
    assert b.pixel_values.shape == (2, 3, 3, 56, 56) and b.boxes.shape == (2, 3, 4)
    assert b.tag_targets.shape == (2, len(tag_vocabulary()))
    assert set(b.model_inputs()) == {"pixel_values", "boxes", "captions", "tag_targets"}


def test_eval_batches_cover_every_region_once_with_planner_views(mini_data):
    test = mini_data.split("test")
    batches = list(iter_image_batches(test, tag_vocabulary(), image_size=28, views=views(2, "phash"), max_regions=3))
    ids = [r.id for b in batches for r in b.regions]
    assert sorted(ids) == sorted(r.id for r in test.regions)
    assert all(len(b) <= 3 for b in batches)
    assert all(ts[0] == 0.0 and len(ts) == 2 for b in batches for ts in b.selected_ts)
    fixed = next(iter_image_batches(test, tag_vocabulary(), image_size=28, views=views(3, "fixed", ts=[0.5, 1.0])))
    assert fixed.selected_ts[0] == [0.0, 0.5, 1.0]
    assert torch.equal(fixed.boxes[0, 2], torch.tensor([v * 28 / 384 for v in test.regions[0].box]))


def test_class_prompts_replace_some_region_texts(mini_data):
    train = mini_data.split("train")
    plain = RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), seed=1)
    assert plain[0].rtc_text is None
    assert "rtc_texts" not in collate_regions([plain[0], plain[1]]).model_inputs()
    ds = RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), seed=1, class_prompt_ratio=0.5)
    samples = [ds[i] for i in range(min(len(ds), 40))]
    is_prompt = [s.rtc_text == f"the {s.region.category}" for s in samples]
    assert 0 < sum(is_prompt) < len(samples)
    assert all(s.rtc_text == s.caption for s, p in zip(samples, is_prompt) if not p)
    assert [ds[i].rtc_text for i in range(10)] == [s.rtc_text for s in samples[:10]]  # seeded
    batch = collate_regions(samples[:4])
    assert batch.model_inputs()["rtc_texts"] == [s.rtc_text for s in samples[:4]]
    assert batch.to(torch.device("cpu")).rtc_texts == batch.rtc_texts
    with pytest.raises(ValueError, match="class_prompt_ratio"):
        RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), class_prompt_ratio=1.5)


def test_phash_view_ratio_mixes_inference_views_into_training(mini_data):
    train = mini_data.split("train")
    n = min(len(train.regions), 40)
    plans = {r.id: plan_views_batch(mini_data.images[r.image_id].path, [r.box], ViewOptions(3, "phash"))[0].selected_ts
             for r in train.regions[:n]}
    random_only = RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), seed=1)
    all_phash = RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), seed=1, phash_view_ratio=1.0)
    assert all(all_phash[i].selected_ts == plans[r.id] for i, r in enumerate(train.regions[:n]))
    assert sum(random_only[i].selected_ts != plans[r.id] for i, r in enumerate(train.regions[:n])) > n // 2
    half = RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), seed=1, phash_view_ratio=0.5)
    picked = [half[i].selected_ts == plans[r.id] for i, r in enumerate(train.regions[:n])]
    assert 0 < sum(picked) < n
    assert [half[i].selected_ts for i in range(n)] == [half[i].selected_ts for i in range(n)]  # seeded
    with pytest.raises(ValueError, match="phash_view_ratio"):
        RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3), phash_view_ratio=-0.1)
    with pytest.raises(ValueError, match="random training views"):
        RegionDataset(train, tag_vocabulary(), image_size=28, views=views(3, "phash"),
                      phash_view_ratio=0.5)


def test_context_objects_list_the_other_objects_inside_each_context_view(mini_data):
    train = mini_data.split("train")
    classes = list(train.categories)
    ds = RegionDataset(train, tag_vocabulary(), image_size=100, views=views(3), seed=1, object_classes=classes)
    assert ds[0].context_objects is not None
    assert RegionDataset(train, tag_vocabulary(), image_size=100, views=views(3))[0].context_objects is None
    region = train.regions[0]
    others = [o for o in train.by_image()[region.image_id] if o.id != region.id]
    W, H = train.images[region.image_id].width, train.images[region.image_id].height
    x1, y1, x2, y2 = (int(v) for v in region.box)
    # view 1 is the whole image: every other object, scaled to 100 px; view 2 is the region's own box: none
    # of the generated neighbours lies 80 % inside it; view 0 (the tight view) is never used
    rows = ds.objects_in_views(region, [(x1, y1, x2, y2), (0, 0, W, H), (x1, y1, x2, y2)])
    assert rows[:, 0].tolist() == [1.0] * len(others)
    for row, o in zip(rows.tolist(), others):
        assert row[1:5] == pytest.approx([o.box[0] * 100 / W, o.box[1] * 100 / H, o.box[2] * 100 / W,
                                          o.box[3] * 100 / H], abs=1e-4)
        assert classes[int(row[5])] == o.category
    # a view that holds 90 % of another object lists it (clipped to the view), one that holds 70 % does not
    o = others[0]
    ox1, oy1, ox2, oy2 = o.box

    def listed(u1):
        rows = ds.objects_in_views(region, [(0, 0, 1, 1), (u1, 0, W, H)]).tolist()
        want = [1.0, 0.0, oy1 * 100 / H, (ox2 - u1) * 100 / (W - u1), oy2 * 100 / H, classes.index(o.category)]
        return any(r == pytest.approx(want, abs=1e-4) for r in rows)

    assert listed(ox1 + 0.1 * (ox2 - ox1)) and not listed(ox1 + 0.3 * (ox2 - ox1))

    batch = collate_regions([ds[i] for i in range(3)])
    counts = [len(ds[i].context_objects) for i in range(3)]
    assert batch.context_objects.shape == (sum(counts), 7)
    assert batch.context_objects[:, 0].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    assert "context_objects" not in batch.model_inputs()  # the model's forward does not take it
    assert torch.equal(batch.to(torch.device("cpu")).context_objects, batch.context_objects)
