"""Markdown tables, as every report of transferlab writes them (results, sweep report, ranking)."""


def markdown_table(header: list, rows: list[list]) -> str:
    """A pipe table: the header, its rule, one line per row; cells as `str` gives them."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
