"""Vocabularies of the model: tags (D_tag), class names (recognition) and attributes (D_rtc prompts).

The default lists were written for this project: `tags.txt` (common objects, parts, materials, colours,
scenes, actions), `coco_classes.txt` (the 80 COCO names in COCO order) and `attributes.txt` (a short
OVAD-style attribute list). The released checkpoint was trained with RAM's 4585-tag list; a user who
has `ram_tag_list.txt` loads it with `Vocabulary.default().with_tags_file(path)`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Attribute:
    """One attribute "<kind> <type>:<syn1>/<syn2>" where kind is "is" or "has"."""

    kind: str
    type: str
    synonyms: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.type}:{'/'.join(self.synonyms)}"

    def prompts(self) -> list[str]:
        """Prompts of spec 4.0 (OVAD "the" templates with an empty noun; the double space is kept)."""
        obj = self.type.replace(" tone", "")
        synonyms = list(self.synonyms)
        # The release widens two age attributes with extra words.
        if "/".join(synonyms) == "young/baby":
            synonyms += ["kid", "kids", "child", "toddler", "boy", "girl"]
        elif "/".join(synonyms) == "adult/old/aged":
            synonyms += ["teen", "elder"]
        out = []
        for syn in synonyms:
            if self.kind == "has":
                out += [f"the {syn} {obj}", f"the  has {syn} {obj}"]
            else:
                out += [f"the {syn}", f"the  is {syn}"]
        return out


def _read_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def parse_attribute(line: str) -> Attribute:
    kind, _, rest = line.partition(" ")
    type_, sep, syns = rest.partition(":")
    if kind not in ("is", "has") or not sep or not syns:
        raise ValueError(f"attribute line {line!r} is not '<is|has> <type>:<syn1>/<syn2>...'")
    return Attribute(kind, type_.strip(), tuple(s.strip() for s in syns.split("/") if s.strip()))


def _check_names(kind: str, names: list[str]) -> list[str]:
    names = [str(n).strip() for n in names]
    if not names:
        raise ValueError(f"the {kind} list is empty; give at least one name")
    bad = [n for n in names if not n or "\n" in n]
    if bad:
        raise ValueError(f"empty or multi-line {kind} names: {bad[:5]}")
    seen, dups = set(), []
    for n in names:
        if n in seen:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ValueError(f"duplicate {kind} names {dups[:10]}: each name must appear once")
    return names


def class_prompt(name: str) -> str:
    """The recognition prompt of a class name (spec 4.0): "the {name}", lower-cased."""
    return f"the {name.lower()}"


def read_attributes(path: str | Path) -> list[Attribute]:
    """Attributes from OVAD's `ovad2000.json` (the release's `model_configs/ovad2000.json`: an "attributes"
    list of {"id", "name": "<type>:<syn1>/<syn2>", "is_has_att": "is" | "has"}, taken in id order) or from a
    text file of "<is|has> <type>:<syn1>/<syn2>" lines (ours)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file {path} does not exist")
    if path.suffix.lower() != ".json":
        return [parse_attribute(line) for line in _read_lines(path)]
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("attributes") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} has no 'attributes' list (expected OVAD's ovad2000.json)")
    try:
        entries = sorted(entries, key=lambda e: e.get("id", 0))
        return [parse_attribute(f"{e['is_has_att']} {e['name']}") for e in entries]
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: every attribute needs 'name' and 'is_has_att' as in ovad2000.json ({err!r})") from err


@dataclass
class Vocabulary:
    """Tags, class names and attributes, and where each list came from (`sources`, saved with a model)."""

    tags: list[str]
    classes: list[str]
    attributes: list[Attribute] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tags = _check_names("tag", self.tags)
        self.classes = _check_names("class", self.classes)
        self.attributes = [a if isinstance(a, Attribute) else parse_attribute(a) for a in self.attributes]

    @classmethod
    def default(cls) -> "Vocabulary":
        return dataclasses.replace(cls.from_folder(HERE), sources={
            "tags": "dynrefer-core tags.txt", "classes": "COCO-80", "attributes": "dynrefer-core attributes.txt"})

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Vocabulary":
        folder = Path(folder)
        missing = [n for n in ("tags.txt", "coco_classes.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"vocabulary folder {folder} lacks {missing}")
        attributes = folder / "attributes.txt"
        sources = folder / "sources.json"
        return cls(
            tags=_read_lines(folder / "tags.txt"),
            classes=_read_lines(folder / "coco_classes.txt"),
            attributes=[parse_attribute(a) for a in _read_lines(attributes)] if attributes.is_file() else [],
            sources=json.loads(sources.read_text(encoding="utf-8")) if sources.is_file() else {},
        )

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tags.txt").write_text("\n".join(self.tags) + "\n", encoding="utf-8")
        (folder / "coco_classes.txt").write_text("\n".join(self.classes) + "\n", encoding="utf-8")
        lines = [f"{a.kind} {a.name}" for a in self.attributes]
        (folder / "attributes.txt").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        if self.sources:
            (folder / "sources.json").write_text(json.dumps(self.sources, indent=2) + "\n", encoding="utf-8")

    def with_tags_file(self, path: str | Path) -> "Vocabulary":
        """A copy with the tag list read from `path` (one tag per line, e.g. RAM's ram_tag_list.txt)."""
        return dataclasses.replace(self, tags=_read_lines(Path(path)),
                                   sources={**self.sources, "tags": Path(path).name})

    def with_attributes_file(self, path: str | Path) -> "Vocabulary":
        """A copy with the attributes of `path` (`read_attributes`: OVAD's ovad2000.json or our text format)."""
        return dataclasses.replace(self, attributes=read_attributes(path),
                                   sources={**self.sources, "attributes": Path(path).name})

    # Texts the frozen text encoder embeds (spec 4.0).
    def class_prompts(self) -> list[str]:
        return [class_prompt(c) for c in self.classes]

    def attribute_prompts(self) -> tuple[list[str], list[int]]:
        """All attribute prompts, and the group size of each attribute (max is taken per group)."""
        prompts = [a.prompts() for a in self.attributes]
        return [p for group in prompts for p in group], [len(group) for group in prompts]

    def words(self) -> list[str]:
        """Every text of the vocabulary (for training a tokenizer)."""
        return self.tags + self.classes + self.attribute_prompts()[0]
