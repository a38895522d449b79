"""The run's core, split by thread and job: records in, outcomes made durable, safe STATE out.

- :mod:`.prepare` — a record becomes a :class:`~target_catena_messages.outcome.Message`
  (reader thread; pure but for numbering).
- :mod:`.admission` — ledger decisions per batch, keys in flight, keys held by another process,
  users resolution, handing claims to delivery (the reader for its batches, the follow-up
  thread for copies handed back; one at a time under the admission lock).
- :mod:`.recorder` — group commit → dead letters flushed → checkpoint settled → STATE line
  (the recorder thread; it never claims or submits).
- :mod:`.preflight` — before input is read, the token and a size-1 operation-list read prove
  the settings (reader thread, once).
- :mod:`.run` — wires them; the end of a run (finish, abort, the summary).

Threads: the *reader* (singer-sdk's main thread) prepares records and admits each batch;
delivery's worker threads send and report each Outcome into the recorder's queue; the *recorder*
makes outcomes durable and hands the later copies of settled keys back to admission, whose
*follow-up thread* admits them (and re-polls keys held elsewhere) even while the reader is
blocked on stdin. No thread calls into another's loop: they hand values over through queues.

Lock order: the admission lock (one admitter at a time) is taken before the run lock. The run
lock (an RLock shared by admission, the recorder and the backlog: it guards the checkpointer,
the report, the keys in flight and the unresolved count) may be held while delivery's lock is
taken (reading ``in_flight``), never the other way round; delivery reports outcomes through a
queue and takes none of ours. The dead-letter writer's lock and the STATE write lock are taken
without the run lock. The rules these modules keep are named in
docs/design.md ("Exactly-once rules").
"""
