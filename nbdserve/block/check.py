"""The result of an image consistency check, shared by every format's checker.

Exit statuses follow ``qemu-img check``: 0 clean, 1 the check could not
complete, 2 corruptions remain, 3 only leaks remain, 63 no checks for this
format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_CLEAN = 0
EXIT_CHECK_FAILED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


@dataclass(slots=True)
class CheckReport:
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int | None = None
    messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.corruptions += 1
        self.messages.append(f"ERROR {message}")

    def leak(self, message: str) -> None:
        self.leaks += 1
        self.messages.append(f"Leaked {message}")

    def exit_status(self) -> int:
        if self.check_errors:
            return EXIT_CHECK_FAILED
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_json(self, filename: str, fmt: str) -> dict[str, object]:
        doc: dict[str, object] = {
            "filename": filename,
            "format": fmt,
            "check-errors": self.check_errors,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
        }
        if self.total_clusters:
            doc.update(
                {
                    "total-clusters": self.total_clusters,
                    "allocated-clusters": self.allocated_clusters,
                    "fragmented-clusters": self.fragmented_clusters,
                    "compressed-clusters": self.compressed_clusters,
                }
            )
        if self.image_end_offset is not None:
            doc["image-end-offset"] = self.image_end_offset
        return doc

    def human(self) -> str:
        lines = list(self.messages)
        if self.corruptions_fixed or self.leaks_fixed:
            lines.append(
                f"The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n"
            )
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines.append(
                    f"\n{self.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it."
                )
            if self.leaks:
                lines.append(
                    f"\n{self.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data."
                )
            if self.check_errors:
                lines.append(
                    f"\n{self.check_errors} internal errors have occurred during the check."
                )
        if self.total_clusters:
            pct = 100.0 * self.allocated_clusters / self.total_clusters
            frag = (
                100.0 * self.fragmented_clusters / self.allocated_clusters
                if self.allocated_clusters
                else 0.0
            )
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = {pct:.2f}% allocated, "
                f"{frag:.2f}% fragmented, "
                f"{100.0 * self.compressed_clusters / max(1, self.allocated_clusters):.2f}% "
                "compressed clusters"
            )
        if self.image_end_offset is not None:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)
