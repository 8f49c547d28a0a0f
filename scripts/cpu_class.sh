#!/usr/bin/env bash
# The processor class every recorded figure names: amx (AMX-BF16 tiles), avx512bf16 (AVX512-BF16 dot products, no
# AMX), avx2 (neither: bf16 is emulated and slower than fp32), or other (no AVX2 either, or no /proc/cpuinfo).
# The same reading as selfplay.backends.precision.cpu_class, without Python, so CI can name it even when the
# install failed.
# SELFPLAY_CPUINFO: another cpuinfo file to read (the tests check this script against the Python reading).
flags="$(grep -m1 '^flags' "${SELFPLAY_CPUINFO:-/proc/cpuinfo}" 2>/dev/null | cut -d: -f2)"
case " $flags " in
  *" amx_bf16 "*) echo amx ;;
  *" avx512_bf16 "*) echo avx512bf16 ;;
  *" avx2 "*) echo avx2 ;;
  *) echo other ;;
esac
