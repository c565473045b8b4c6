#!/usr/bin/env bash
# Boots a Debian kernel with soft-RoCE (rdma_rxe) under QEMU TCG from an initramfs built out
# of Debian packages, and runs ferry-rdma-check inside it: the RDMA data path over real verbs.
# KVM does not run inside a TCG guest, so this covers everything below the KVM boundary.
#
#   tests/rxe/run.sh BINARY            # the check suite; exits 1 unless every check passed
#   RXE_BENCH=1 tests/rxe/run.sh BINARY  # the suite, then the RDMA-vs-TCP benchmark
#
# Work files (downloaded .debs, the initramfs) live in $RXE_WORK, default target/rxe.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
binary=$(readlink -f "${1:?usage: run.sh path/to/ferry-rdma-check}")
W=${RXE_WORK:-$here/../../target/rxe}
mkdir -p "$W"; W=$(cd "$W" && pwd)
ARCH=x86_64-linux-gnu

need=""
for t in cpio:cpio qemu-system-x86_64:qemu-system-x86 ldconfig:libc-bin; do
    command -v "${t%%:*}" >/dev/null || need="$need ${t#*:}"
done
if [ -n "$need" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

# ---- 1. Debian packages: a kernel with rdma_rxe, busybox, rdma-core ---------------------------
DEBS=$W/debs; mkdir -p "$DEBS"
KVER=${KVER:-}
if [ -z "$KVER" ]; then
    f=$(ls "$DEBS"/linux-image-*-amd64_*.deb 2>/dev/null | grep -v unsigned | head -1 || true)
    if [ -n "$f" ]; then
        KVER=$(basename "$f" | sed 's/^linux-image-\([^_]*\)_.*/\1/')
    else
        KVER=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-//p' | head -1)
        if [ -z "$KVER" ]; then
            apt-get update -qq
            KVER=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-//p' | head -1)
        fi
    fi
fi
echo "rxe: guest kernel $KVER" >&2
for p in linux-image-$KVER busybox-static libibverbs1 ibverbs-providers librdmacm1 iproute2 kmod; do
    ls "$DEBS/${p}"_*.deb >/dev/null 2>&1 || (cd "$DEBS" && apt-get download "$p" >/dev/null 2>&1) \
        || { apt-get update -qq; (cd "$DEBS" && apt-get download "$p" >/dev/null); }
done

# ---- 2. unpack, find the module closure --------------------------------------------------------
U=$W/unpack; rm -rf "$U"; mkdir -p "$U"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$U"; done
depmod_bin=$U/bin/kmod; [ -x "$depmod_bin" ] || depmod_bin=$U/usr/bin/kmod
mkdir -p "$W/tools"; ln -sf "$depmod_bin" "$W/tools/depmod"
"$W/tools/depmod" -b "$U" "$KVER"
MD=$U/lib/modules/$KVER
ORDER=()
add() { local x; for x in "${ORDER[@]:-}"; do [ "$x" = "$1" ] && return; done; ORDER+=("$1"); }
for m in dummy crc32_generic rdma_rxe rdma_ucm; do
    line=$(grep -E "/${m}\.ko(\.xz|\.zst)?:" "$MD/modules.dep") || { echo "rxe: module $m not found" >&2; exit 1; }
    path=${line%%:*}; deps=(${line#*:})
    for ((i=${#deps[@]}-1; i>=0; i--)); do add "${deps[$i]}"; done
    add "$path"
done

# ---- 3. the initramfs --------------------------------------------------------------------------
R=$W/rootfs; rm -rf "$R"
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,etc,opt,usr/bin,usr/lib/$ARCH/libibverbs,usr/lib64,root}
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
cp "$U/bin/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
for p in "${ORDER[@]}"; do mkdir -p "$R/lib/modules/$KVER/$(dirname "$p")"; cp "$MD/$p" "$R/lib/modules/$KVER/$p"; done
printf '%s\n' "${ORDER[@]}" > "$R/etc/rxe-modules.order"
cp -a "$U"/usr/lib/$ARCH/libibverbs/librxe-rdmav*.so "$R/usr/lib/$ARCH/libibverbs/"
mkdir -p "$R/etc/libibverbs.d"; cp "$U/etc/libibverbs.d/rxe.driver" "$R/etc/libibverbs.d/"
cp "$U/usr/bin/rdma" "$R/usr/bin/" 2>/dev/null || cp "$U/bin/rdma" "$R/usr/bin/"
cp "$binary" "$R/opt/ferry-rdma-check"
export LD_LIBRARY_PATH=$U/usr/lib/$ARCH:$U/lib/$ARCH
for f in "$R"/usr/bin/* "$R"/opt/* "$R"/usr/lib/$ARCH/libibverbs/*.so; do
    ldd "$f" | while read -r a b c _; do
        if [ "$b" = "=>" ]; then
            [ "$c" = "not" ] && { echo "rxe: missing library $a for $f" >&2; exit 1; }
            [ -e "$R/usr/lib/$ARCH/$(basename "$c")" ] || cp -L "$c" "$R/usr/lib/$ARCH/"
        elif [ "${a#/}" != "$a" ]; then
            cp -L "$a" "$R/usr/lib64/$(basename "$a")"
        fi
    done
done
ldconfig -r "$R" 2>/dev/null || true
cp "$here/init.sh" "$R/init"; chmod 755 "$R/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "127.0.0.1 localhost" > "$R/etc/hosts"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$W/initrd.gz"
cp "$U/boot/vmlinuz-$KVER" "$W/vmlinuz"

# ---- 4. boot under TCG and collect the results -------------------------------------------------
append="console=ttyS0 panic=-1 loglevel=3 ferry_bench=${RXE_BENCH:-0} ferry_mib=${RXE_MIB:-64}"
started=$(date +%s)
set +e
timeout "${RXE_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic \
    -no-reboot -nic none -kernel "$W/vmlinuz" -initrd "$W/initrd.gz" -append "$append" \
    > "$W/console.log" 2>&1
rc=$?
set -e
tr -d '\r' < "$W/console.log" > "$W/console.txt"
grep -E '^(RESULT|BENCH|RDMA SUMMARY)' "$W/console.txt" || true
echo "rxe: guest ran $(( $(date +%s) - started )) s (qemu exit $rc); console in $W/console.txt" >&2
summary=$(grep '^RDMA SUMMARY' "$W/console.txt" | tail -1 || true)
if [ "$rc" != 0 ] || [ -z "$summary" ] || grep -q '^RESULT .* FAIL' "$W/console.txt" \
    || ! echo "$summary" | grep -q ' 0 failed'; then
    echo "rxe: FAILED" >&2
    tail -n 40 "$W/console.txt" >&2
    exit 1
fi
if [ "${RXE_BENCH:-0}" = 1 ] && grep -q '^BENCH .*FAILED' "$W/console.txt"; then
    echo "rxe: benchmark FAILED" >&2; exit 1
fi
