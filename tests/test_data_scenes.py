"""The procedural scene generator and the generate CLI."""
import json

import numpy as np
import pytest

from dynrefer_core.data import scenes
from dynrefer_core.data.generate import generate, main, split_of


def test_same_seed_same_scene_different_seed_different():
    a = scenes.generate_scene(scenes.scene_rng(7, 3))
    b = scenes.generate_scene(scenes.scene_rng(7, 3))
    c = scenes.generate_scene(scenes.scene_rng(8, 3))
    assert a.jpeg == b.jpeg
    assert [o.to_dict() for o in a.objects] == [o.to_dict() for o in b.objects]
    assert a.jpeg != c.jpeg


def test_scene_statistics_over_many_images():
    cfg = scenes.SceneConfig()
    seen_cats, seen_cols, seen_pats, seen_sizes = set(), set(), set(), set()
    for i in range(40):
        s = scenes.generate_scene(scenes.scene_rng(0, i), cfg)
        assert s.image.size == (cfg.width, cfg.height)
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        for o in s.objects:
            lo, hi = scenes.SIZES[o.size]
            assert lo <= o.diameter <= hi
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= cfg.width and 0 <= y1 < y2 <= cfg.height
            assert x2 - x1 <= o.diameter + 2 and y2 - y1 <= o.diameter + 2  # visible box within the drawn patch
            seen_cats.add(o.category), seen_cols.add(o.colour), seen_pats.add(o.pattern), seen_sizes.add(o.size)
    assert seen_cats == set(scenes.CATEGORIES) and len(seen_cats) >= 10
    assert seen_cols == set(scenes.COLOURS) and len(seen_cols) == 8
    assert seen_pats == {"solid", "striped", "dotted", "checked"}
    assert seen_sizes == {"tiny", "small", "large"}
    assert scenes.SIZES["tiny"][0] >= 8 and scenes.SIZES["tiny"][1] <= 20


def test_caption_tags_and_relation_agree_with_geometry():
    s = scenes.generate_scene(scenes.scene_rng(1, 0))
    for i, o in enumerate(s.objects):
        n = s.objects[o.neighbour]
        assert o.neighbour != i
        art = "an" if n.colour == "orange" else "a"
        assert s.caption(i) == (f"a {o.size} {o.colour} {o.pattern} {o.category} {o.relation} "
                                f"{art} {n.colour} {n.category}")
        cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
        nx, ny = (n.box[0] + n.box[2]) / 2, (n.box[1] + n.box[3]) / 2
        if o.relation == "left of":
            assert cx < nx and abs(cx - nx) >= abs(cy - ny)
        elif o.relation == "right of":
            assert cx > nx and abs(cx - nx) >= abs(cy - ny)
        elif o.relation == "above":
            assert cy < ny and abs(cy - ny) > abs(cx - nx)
        else:
            assert o.relation == "below" and cy > ny and abs(cy - ny) > abs(cx - nx)
        # the neighbour is the nearest other object
        d = [np.hypot((p.box[0] + p.box[2]) / 2 - cx, (p.box[1] + p.box[3]) / 2 - cy)
             for j, p in enumerate(s.objects) if j != i]
        assert np.hypot(nx - cx, ny - cy) == pytest.approx(min(d))
        set1, set2 = s.tags(i)
        assert set1 == [o.size, o.colour, o.pattern, o.category] and set2 == [o.relation, n.colour, n.category]
        att = s.attributes(i)
        assert sum(att) == 3 and att[scenes.ATTRIBUTES.index(o.pattern)] == 1


def test_neighbours_are_adjacent_unambiguous_and_in_the_narrow_context_views():
    """The neighbour a caption names is clearly the nearest object, and it shows in the t = 0.2 view
    (pHASH selection picks t = 0.1 and 0.2 for most regions) but not in the tight view (t = 0)."""
    from dynrefer_core.views.geometry import crop_boxes, region_box, view_boxes

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    seen, in_context, ratios = 0, 0, []
    for i in range(30):
        s = scenes.generate_scene(scenes.scene_rng(5, i))
        size = s.image.size
        centres = np.array([((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in s.objects])
        for k, o in enumerate(s.objects):
            d = np.hypot(*(centres - centres[k]).T)
            d[k] = np.inf
            first, second = np.sort(d)[:2]
            ratios.append(second / first)
            n = s.objects[o.neighbour].box
            crop = crop_boxes(view_boxes(region_box(o.box, size), size, [0.2]), size)[0]
            seen += 1
            in_context += overlap(n, crop) >= 0.25 * (n[2] - n[0]) * (n[3] - n[1])
            assert overlap(n, o.box) < 0.5 * (n[2] - n[0]) * (n[3] - n[1])  # mostly outside the tight view
    # placement keeps 1.3 on the drawn boxes; occlusion moves visible centres a little
    assert np.mean(np.array(ratios) >= 1.2) > 0.97
    assert in_context / seen > 0.8


def test_tiny_patterns_only_visible_up_close():
    """A tiny striped object and a solid one differ a lot pixel by pixel, but hardly once the image is
    shrunk 4x the way a whole-image view at 112 px shrinks a 384 px scene."""
    rng = np.random.default_rng(0)
    d = 14
    stripes = scenes.pattern_field("striped", d, d, d, rng)
    assert 0.3 < stripes.mean() < 0.7  # both colours present up close
    base = np.array(scenes.COLOURS["red"], np.float32)
    striped = base * (1 - stripes[..., None]) + base * 0.38 * stripes[..., None]
    import cv2

    small = cv2.resize(striped, (d // 4, d // 4), interpolation=cv2.INTER_AREA)
    assert striped.std(axis=(0, 1)).max() > 40  # strong texture at full resolution
    assert small.std(axis=(0, 1)).max() < 15  # nearly flat after shrinking


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="4 <= min <= max"):
        scenes.SceneConfig(min_objects=3)
    with pytest.raises(ValueError, match="too small"):
        scenes.SceneConfig(width=100)
    with pytest.raises(ValueError, match="unknown category"):
        scenes.shape_mask("dragon", 20, np.random.default_rng(0))


def test_generate_cli_writes_release_format(tmp_path, capsys):
    main(["--seed", "3", "--num-images", "10", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "annotations.json").read_text())
    assert set(data) == {"dataset", "images", "annotations"}
    assert data["dataset"]["image_root"] == "images"
    assert [im["split"] for im in data["images"]] == ["train"] * 8 + ["val", "test"]
    tags = data["dataset"]["tag_list"]
    for a in data["annotations"]:
        x1, y1, x2, y2 = a["bbox"]
        assert a["segmentation"] == [[x1, y1, x2, y1, x2, y2, x1, y2]]
        pr = a["extra_info"]["parser_result"]
        assert [tags[i] for i in pr["tag_set1"]] == a["extra_info"]["tags"]["tag_set1"]
        assert [tags[i] for i in pr["tag_set2"]] == a["extra_info"]["tags"]["tag_set2"]
        assert a["extra_info"]["coco_result"]["category"] in a["caption"].split()
    for im in data["images"]:
        assert (tmp_path / "images" / im["file_name"]).is_file()
    assert "10 images" in capsys.readouterr().out


def test_image_i_does_not_depend_on_num_images_and_split_flag(tmp_path):
    generate(5, 3, tmp_path / "a")
    generate(5, 1, tmp_path / "b", split="test")
    name = "s5_000000.jpg"
    assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    b = json.loads((tmp_path / "b/annotations.json").read_text())
    assert [im["split"] for im in b["images"]] == ["test"]
    assert split_of(18, "all") == "val" and split_of(19, "all") == "test" and split_of(17, "all") == "train"
    with pytest.raises(ValueError, match="--num-images 0"):
        generate(5, 0, tmp_path / "c")
