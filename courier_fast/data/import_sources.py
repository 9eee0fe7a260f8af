"""Reading a user's interaction and item files into DuckDB for `courier-fast import`.

A source is a CSV, TSV, parquet or JSON-lines file (gzip-compressed text files too; the format
comes from the suffix, or `fmt=`). Every column we need is staged as VARCHAR in a DuckDB table
whose `row` column is the 0-based data row of the file (the header is not a row), so that every
later error can name the file, row and column. Column names are checked against the file's
header first: a wrong name is one error listing the columns there are.
"""
import os

FORMATS = ("csv", "tsv", "parquet", "jsonl")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet",
             ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def one(con, sql):
    """The first row of a query (read to the end: DuckDB keeps a connection busy until then), or None."""
    rows = con.execute(sql).fetchall()
    return rows[0] if rows else None


def sql_string(value):
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_name(name):
    """A SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


def format_of(path, fmt=None):
    """The source format of `path`: `fmt` when given, else from its suffix (.gz ignored)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    stem = path[:-3] if path.endswith(".gz") else path
    suffix = os.path.splitext(stem)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; "
                         f"name it .csv/.tsv/.parquet/.jsonl or pass the format ({', '.join(FORMATS)})")
    return _SUFFIXES[suffix]


class Source:
    """One input file: its path, format and the SQL that scans it (all text columns as VARCHAR)."""

    def __init__(self, path, fmt=None, delimiter=None, header=True):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: the file is empty")
        self.path, self.fmt = path, format_of(path, fmt)
        p = sql_string(os.path.abspath(path))
        if self.fmt in ("csv", "tsv"):
            delim = delimiter or ("\t" if self.fmt == "tsv" else ",")
            self.scan = f"read_csv({p}, all_varchar=true, header={'true' if header else 'false'}, delim={sql_string(delim)})"
        elif self.fmt == "parquet":
            self.scan = f"read_parquet({p})"
        else:
            self.scan = f"read_json({p}, format='newline_delimited')"

    def columns(self, con):
        """The file's column names (the header / schema), or a ValueError naming the file."""
        import duckdb

        try:
            return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {self.scan}").fetchall()]
        except duckdb.Error as exc:
            raise ValueError(f"{self.path}: cannot read it as {self.fmt}: {exc}") from None

    def stage(self, con, table, wanted):
        """CREATE TABLE `table` (row BIGINT, <alias> VARCHAR ...) from wanted = {alias: column};
        -> number of rows. A column that is not there, or an empty file, is a ValueError."""
        import duckdb

        have = self.columns(con)
        for alias, column in wanted.items():
            if column not in have:
                raise ValueError(f"{self.path}: header row: no column '{column}' (for {alias}); "
                                 f"the columns are: {', '.join(have)}")
        select = ", ".join(f"CAST({sql_name(c)} AS VARCHAR) AS {sql_name(a)}" for a, c in wanted.items())
        try:
            con.execute(f"CREATE TABLE {table}_data AS SELECT {select} FROM {self.scan}")
            # rowid of a table filled by one insertion is the position in the file (insertion order is kept)
            con.execute(f"CREATE VIEW {table} AS SELECT rowid AS row, * FROM {table}_data")
        except duckdb.Error as exc:
            raise ValueError(f"{self.path}: cannot read it as {self.fmt}: {exc}") from None
        n = one(con, f"SELECT count(*) FROM {table}")[0]
        if n == 0:
            raise ValueError(f"{self.path}: no data rows")
        return n
