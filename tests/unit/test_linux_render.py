"""Golden text for panic.txt / tasks.txt and the task state letters."""

from __future__ import annotations

from progdump.layers.linux.render import render_panic, render_tasks
from progdump.layers.linux.tasks import task_state_letter

FRAME_ORC = {
    "address": "0xffffffff81000110",
    "symbol": "sysrq_handle_crash+0x16/0x20",
    "method": "orc",
    "reliable": True,
    "stack_addr": None,
    "note": None,
}
FRAME_SCAN = {
    "address": "0xffffffff81000215",
    "symbol": "vfs_write+0xc4/0x3f0",
    "method": "stack scan",
    "reliable": False,
    "stack_addr": "0xffffc90000013f08",
    "note": "after a call",
}

PANIC = {
    "panic_message": "sysrq triggered crash",
    "panic_message_source": "the kernel log",
    "identity": {"release": "6.1.0-56-cloud-amd64", "hostname": "pdguest", "panic_cpu": 0, "panic_task": "sh[152]"},
    "degraded": [],
    "cpus": [
        {
            "cpu": 0,
            "panicking": True,
            "rip_symbol": "delay_tsc+0x33/0xa0",
            "task": "sh[152]",
            "regs": {"rip": "0xffffffff81000110", "rsp": "0xffffc90000013f00"},
        }
    ],
    "backtrace": {
        "log": ["Call Trace:", " <TASK>", " sysrq_handle_crash+0x16/0x20", " ? _printk+0x68/0x83"],
        "orc": {"cpu": 0, "frames": [FRAME_ORC], "end": "reached user mode"},
        "scan": {"cpu": 0, "frames": [FRAME_SCAN], "end": "top of stack"},
    },
    "log_tail": "[    3.194461] PD-KMSG-x\n",
    "log_bytes": 25,
    "log_records": 1,
    "console_tail": "console\n",
}

PANIC_TXT = """\
progdump layer 0: Linux panic, read from the frozen guest's memory (no debug info used)

Kernel panic - not syncing: sysrq triggered crash
  (message from the kernel log)
release:      6.1.0-56-cloud-amd64
hostname:     pdguest
panic_cpu:    0
panic_task:   sh[152]

---- CPU 0 (panicking): RIP delay_tsc+0x33/0xa0  task sh[152]
      RIP: ffffffff81000110     RSP: ffffc90000013f00

---- panic backtrace 1: the kernel's own Call Trace, from the log (method: log; lines with '?' are the kernel's own guesses)
  Call Trace:
   <TASK>
   sysrq_handle_crash+0x16/0x20
   ? _printk+0x68/0x83

---- panic backtrace 2: ORC unwind of CPU 0 from its frozen registers (method: orc; reliable while stack and tables are intact)
 #0    sysrq_handle_crash+0x16/0x20                     [orc]
  unwind ended: reached user mode

---- panic backtrace 3: stack scan of every stack the unwind crossed (method: stack scan; text addresses after a call instruction: may be stale, '?')
 #0  ? vfs_write+0xc4/0x3f0                             [stack scan] (stack 0xffffc90000013f08)
  scan ended: top of stack

---- kernel log: last 25 bytes of 25 (1 records; dmesg.txt has the log as recovered) ----
[    3.194461] PD-KMSG-x

---- console tail (last 8 bytes; console.txt has more) ----
console
"""


def test_panic_txt_golden() -> None:
    assert render_panic(PANIC) == PANIC_TXT


def test_tasks_txt_golden() -> None:
    d = {
        "notes": [],
        "tasks": [
            {
                "task": "0xffff888001000000",
                "pid": 138,
                "tgid": 138,
                "ppid": 1,
                "comm": "pdmarker",
                "state": "S",
                "cpu": 0,
                "on_cpu": False,
                "kthread": False,
                "stack": "0xffffc90000010000",
                "last_ran_ns_before_panic": 2_500_000_000,
                "backtrace": [FRAME_ORC],
                "unwind_note": "from saved switch frame (thread.sp); end",
            }
        ],
        "modules": [{"name": "qemu_fw_cfg", "state": "live", "base": "0xffffffffc0000000", "size": 20480}],
        "memory": {"nr_free_pages": 256, "nr_kernel_stack_kb": 896},
    }
    assert (
        render_tasks(d)
        == """\
progdump layer 1: Linux tasks, read from the frozen guest's memory with its own BTF

1 tasks
    PID    PPID    TGID CPU ST   LAST RAN TASK               COMM
    138       1     138   0 S      2.500s 0xffff888001000000 pdmarker
(LAST RAN: how long before the panic the task was last on a CPU, by that CPU's run-queue clock)

---- kernel stacks ('?' marks stack-scan guesses; [method] on every frame) ----
PID 138 (pdmarker) state S cpu 0 task 0xffff888001000000 stack 0xffffc90000010000: from saved switch frame (thread.sp); end
 #0    sysrq_handle_crash+0x16/0x20                     [orc]

---- modules (1) ----
  qemu_fw_cfg                 20480  live     0xffffffffc0000000

---- memory (kernel counters, 4 KiB pages) ----
  nr_free_pages                       256  (1.0 MiB)
  nr_kernel_stack_kb                  896
"""
    )


def test_task_state_letters() -> None:
    assert task_state_letter(0, 0) == "R"
    assert task_state_letter(1, 0) == "S"
    assert task_state_letter(2, 0) == "D"
    assert task_state_letter(0x402, 0) == "I"
    assert task_state_letter(0, 0x20) == "Z"
    assert task_state_letter(0, 0x10) == "X"
    assert task_state_letter(4, 0) == "T"
