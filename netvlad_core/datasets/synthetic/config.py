"""The synthetic city's options (:class:`SyntheticConfig`) and its fixed constants."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from ...errors import NetVLADError

SPLITS = ("train", "val", "test")
UTM_ORIGIN = (585000.0, 4477000.0)
SPLIT_SPACING_M = 2000.0  # districts lie this far apart along the easting
META_JSON = "synthetic.json"
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by netvlad_core.datasets.synthetic (deterministic header)"

DB_CAMERA_HEIGHT_M = 2.5  # a car roof, like Google Street View
MAX_HITS = 6  # visible wall segments per image column (front to back)
MAX_VIEW_M = 400.0


@dataclass
class SyntheticConfig:
    """Size and difficulty of the synthetic city.

    ``seed``: the city (palette, districts, poses, conditions); ``width``/``height``: image size in
    pixels; ``*_blocks``: city blocks per split (a near-square grid, streets between and around them);
    ``db_spacing_m``: distance between database positions along a street; ``headings``: database
    yaws per position, evenly spaced, the first ``heading_offset_deg`` from the street direction;
    ``*_queries``: queries per split; ``hfov_deg``: horizontal field of view of the database camera
    (queries: 0.85–1.1 times it); ``query_offset_m``: largest offset of a query from its database
    position along the street (across it at most 3 m); ``query_yaw_jitter_deg``: largest yaw change
    of a query from its database heading; ``jpeg_quality``: of every image.
    """

    seed: int = option(0, "synthetic: seed of the city and its views (another seed, another city).")
    width: int = option(320, "synthetic: image width in pixels.")
    height: int = option(240, "synthetic: image height in pixels.")
    train_blocks: int = option(9, "synthetic: city blocks in the train district.")
    val_blocks: int = option(2, "synthetic: city blocks in the val district.")
    test_blocks: int = option(6, "synthetic: city blocks in the test district.")
    db_spacing_m: float = option(4.0, "synthetic: metres between database positions along a street.")
    headings: int = option(4, "synthetic: database headings (yaws) per position.")
    heading_offset_deg: float = option(45.0, "synthetic: first heading from the street direction.", cli=False)
    train_queries: int = option(400, "synthetic: queries in the train split.")
    val_queries: int = option(150, "synthetic: queries in the val split.")
    test_queries: int = option(300, "synthetic: queries in the test split.")
    hfov_deg: float = option(65.0, "synthetic: horizontal field of view of the database camera.", cli=False)
    query_offset_m: float = option(8.0, "synthetic: largest offset of a query along the street.", cli=False)
    query_yaw_jitter_deg: float = option(30.0, "synthetic: largest yaw change of a query.", cli=False)
    jpeg_quality: int = option(90, "synthetic: JPEG quality of every image.", cli=False)

    def validate(self) -> None:
        """Raise :class:`NetVLADError` naming the first option that is out of range."""
        checks = [
            ("seed", self.seed >= 0, "must be >= 0"),
            ("width", 32 <= self.width <= 4096, "must be in 32..4096"),
            ("height", 24 <= self.height <= 4096, "must be in 24..4096"),
            ("train_blocks", 1 <= self.train_blocks <= 400, "must be in 1..400"),
            ("val_blocks", 1 <= self.val_blocks <= 400, "must be in 1..400"),
            ("test_blocks", 1 <= self.test_blocks <= 400, "must be in 1..400"),
            ("db_spacing_m", 0.5 <= self.db_spacing_m <= 15.0, "must be in 0.5..15 metres"),
            ("headings", 1 <= self.headings <= 36, "must be in 1..36"),
            ("heading_offset_deg", -360.0 <= self.heading_offset_deg <= 360.0, "must be in -360..360 degrees"),
            ("train_queries", self.train_queries >= 1, "must be >= 1"),
            ("val_queries", self.val_queries >= 1, "must be >= 1"),
            ("test_queries", self.test_queries >= 1, "must be >= 1"),
            ("hfov_deg", 20.0 <= self.hfov_deg <= 120.0, "must be in 20..120 degrees"),
            ("query_offset_m", 0.0 <= self.query_offset_m <= 12.0, "must be in 0..12 metres"),
            ("query_yaw_jitter_deg", 0.0 <= self.query_yaw_jitter_deg <= 90.0, "must be in 0..90 degrees"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in 1..100"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise NetVLADError(f"synthetic option {name}={getattr(self, name)!r} {why}")

    def blocks(self, split: str) -> int:
        return int(getattr(self, f"{split}_blocks"))

    def queries(self, split: str) -> int:
        return int(getattr(self, f"{split}_queries"))
