"""Writer process for the SIGKILL test: appends reports forever, printing each id once committed."""

from __future__ import annotations

import sys
from pathlib import Path

from esper.leyline import pb
from esper.tamiyo.field_reports import FieldReportStore

store = FieldReportStore(Path(sys.argv[1]))
i = 0
while True:
    report = pb.FieldReport(report_id=f"r{i}", command_id=f"c{i}", training_run_id="run1",
                            outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS, notes="x" * 200)
    report.issued_at.FromMilliseconds(1_700_000_000_000 + i)
    store.append(report)
    print(report.report_id, flush=True)  # only after the commit returned
    i += 1
