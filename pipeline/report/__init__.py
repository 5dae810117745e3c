"""The last stage: what a run did, kept under `<output>/_surgery/`.

`records` is the contract schedulers read: one record per checkpoint, the
run's summary, the spec it ran, the table `run` prints; `html_page` draws
them as one page a person reads (`ckpt-surgery report`).

The names below are the package's surface, used as `report.record`, ...
"""
from pipeline.report.records import (REPORT_DIR, SPEC_FILE, STATUSES, WRITE_PATHS, check_writable,
                                     count_records, format_table, latest_run, new_run_id, read_report,
                                     read_spec, record, report_dir, run_dir, save_known, save_record, save_spec,
                                     saved_records, size, summarize, write_report, write_whole)
