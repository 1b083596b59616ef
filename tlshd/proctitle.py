"""Process titles that `ps` shows, with the name `pidof` and `pgrep -x` match kept.

`ps` and `top` show the title ("tlshd: supervisor", "tlshd: worker idle",
"tlshd: worker <peer> <phase>").  setproctitle writes it over the argument
area (/proc/PID/cmdline) and also copies it into the kernel's task name
(/proc/PID/comm, 15 bytes: "tlshd: supervis").  `pgrep -x tlshd` matches that
name, and `pidof tlshd` matches it or the base name of argv[0], which is now
the whole title: both would stop finding the daemon, as they find upstream's.
So the task name is set back to "tlshd" (setthreadtitle: prctl(PR_SET_NAME),
which names the calling thread; every caller is its process's main thread).
"""

from __future__ import annotations

from setproctitle import setproctitle, setthreadtitle

# What pidof and pgrep -x find, for the supervisor and its workers alike
# (upstream's forked children carry its name too).
PROCESS_NAME = "tlshd"


def set_title(title: str) -> None:
    """Show `title` in ps; keep the process name `tlshd`."""
    setproctitle(title)
    setthreadtitle(PROCESS_NAME)
