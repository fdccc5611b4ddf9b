#!/usr/bin/env python3
"""Cargo runner for the firmware workspace: boots an ELF in qemu-system-arm's mps2-an386.

* An embedded-test binary (it has an `.embedded_test` section): reads the test list from the
  ELF's symbols (each symbol name is a JSON object; the symbol's data holds the test function's
  address), boots QEMU once per test with `run_addr <address>` on the semihosting command line,
  and prints libtest's format, ending with the `test result:` line scripts/test.sh counts.
  Arguments: an optional name filter, `--exact`, `--list`, `--nocapture` (print what every test
  printed over semihosting, not only a failed one's); others that libtest takes are accepted.
* Any other ELF (the firmware): runs it with UART0 on this process's stdin/stdout until QEMU
  exits (Ctrl-A X) or is killed.

On a bench board, `probe-rs run --chip <chip>` takes this script's place (docs/hil.md).
Guest time is deterministic (`-icount shift=0,sleep=off`).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import time

QEMU = "qemu-system-arm"
MACHINE = ["-machine", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none",
           "-icount", "shift=0,sleep=off"]


def die(msg):
    print(f"qemu-run: {msg}", file=sys.stderr)
    sys.exit(2)


class Elf:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 1 or d[5] != 1:
            die(f"{path} is not a 32-bit little-endian ELF (build for thumbv7em-none-eabihf)")
        shoff, = struct.unpack_from("<I", d, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x2E)
        self.sections = []
        for i in range(shnum):
            name, typ, _flags, addr, off, size, link, _info, _align, entsize = struct.unpack_from(
                "<IIIIIIIIII", d, shoff + i * shentsize)
            self.sections.append(dict(name=name, type=typ, addr=addr, off=off, size=size, link=link,
                                      entsize=entsize))
        strtab = self.sections[shstrndx]
        for s in self.sections:
            s["name"] = self.cstr(strtab["off"] + s["name"])

    def cstr(self, off):
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode("utf-8", "replace")

    def section(self, name):
        return next((i for i, s in enumerate(self.sections) if s["name"] == name), None)

    def symbols(self):
        for s in self.sections:
            if s["type"] != 2:  # SHT_SYMTAB
                continue
            strtab = self.sections[s["link"]]
            for k in range(s["size"] // s["entsize"]):
                name, value, size, _info, _other, shndx = struct.unpack_from(
                    "<IIIBBH", self.data, s["off"] + k * s["entsize"])
                yield self.cstr(strtab["off"] + name), value, shndx

    def read_addr(self, addr, n):
        """Bytes at a loaded address (from the section that holds it)."""
        for s in self.sections:
            if s["type"] != 8 and s["addr"] <= addr < s["addr"] + s["size"] and s["addr"] != 0:
                off = s["off"] + addr - s["addr"]
                return self.data[off:off + n]
        return None


def tests_of(elf):
    idx = elf.section(".embedded_test")
    if idx is None:
        return None
    sec = elf.sections[idx]
    tests = []
    for name, value, shndx in elf.symbols():
        if shndx != idx or not name.startswith("{"):
            continue
        meta = json.loads(name)
        off = sec["off"] + value - sec["addr"]
        fn_addr, path_ptr, path_len = struct.unpack_from("<III", elf.data, off)
        module = elf.read_addr(path_ptr, path_len)
        module = module.decode() if module else "?"
        # Drop the crate name, as probe-rs does: "on_target::tests::x" -> "tests::x".
        module = module.split("::", 1)[1] if "::" in module else module
        meta["full_name"] = f"{module}::{meta['name']}"
        meta["addr"] = fn_addr
        tests.append(meta)
    tests.sort(key=lambda t: t["full_name"])
    return tests


def run_tests(elf_path, tests, args):
    exact = "--exact" in args
    listing = "--list" in args
    nocapture = "--nocapture" in args
    filters = [a for a in args if not a.startswith("-")]
    chosen = [t for t in tests if not filters or any(
        (t["full_name"] == f) if exact else (f in t["full_name"]) for f in filters)]
    filtered_out = len(tests) - len(chosen)
    if listing:
        for t in chosen:
            print(f"{t['full_name']}: test")
        return 0
    print(f"\nrunning {len(chosen)} tests")
    passed = failed = ignored = 0
    failures = []
    t0 = time.monotonic()
    for t in chosen:
        name = t["full_name"]
        if t.get("ignored"):
            print(f"test {name} ... ignored")
            ignored += 1
            continue
        cmd = [QEMU, *MACHINE, "-serial", "null", "-semihosting-config",
               f"enable=on,target=native,arg=run_addr,arg={t['addr']}", "-kernel", elf_path]
        timeout = t.get("timeout", 60)
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            code, out = p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")
        except subprocess.TimeoutExpired as e:
            code, out = None, f"timed out after {timeout} s\n" + ((e.stdout or b"") + (e.stderr or b"")).decode(
                "utf-8", "replace")
        ok = code == 0
        if t.get("should_panic"):
            ok = code not in (0, None)
        if ok:
            passed += 1
            print(f"test {name} ... ok")
            if nocapture and out.strip():
                print(out.rstrip())
        else:
            failed += 1
            failures.append((name, code, out))
            print(f"test {name} ... FAILED")
    for name, code, out in failures:
        print(f"\n---- {name} (qemu exit {code}) ----\n{out}")
    result = "ok" if failed == 0 else "FAILED"
    print(f"\ntest result: {result}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; "
          f"{filtered_out} filtered out; finished in {time.monotonic() - t0:.2f}s\n")
    return 0 if failed == 0 else 101


def main():
    if len(sys.argv) < 2:
        die("usage: qemu-run.py ELF [test args]")
    if shutil.which(QEMU) is None:
        die(f"{QEMU} is not installed: run scripts/install-deps.sh (Debian package qemu-system-arm)")
    elf_path = sys.argv[1]
    tests = tests_of(Elf(elf_path))
    if tests is not None:
        sys.exit(run_tests(elf_path, tests, sys.argv[2:]))
    os.execvp(QEMU, [QEMU, *MACHINE, "-serial", "stdio", "-kernel", elf_path])


if __name__ == "__main__":
    main()
