//! CPU feature sets: what a VM was given (its CPUID) and whether a host can run it.
//!
//! Migration refuses a destination whose KVM cannot offer every feature bit the VM's CPUID
//! advertises: the guest may already use any of them, and would fault on the new host.

use std::collections::BTreeMap;
use std::fmt;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

/// A CPUID output register holding feature flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FeatureWord {
    /// Leaf 1, ECX.
    Leaf1Ecx,
    /// Leaf 1, EDX.
    Leaf1Edx,
    /// Leaf 7 subleaf 0, EBX.
    Leaf7Ebx,
    /// Leaf 7 subleaf 0, ECX.
    Leaf7Ecx,
    /// Leaf 7 subleaf 0, EDX.
    Leaf7Edx,
    /// Leaf 7 subleaf 1, EAX.
    Leaf7s1Eax,
    /// Leaf 0xD subleaf 0, EAX (user XSAVE components).
    LeafDEax,
    /// Leaf 0xD subleaf 1, EAX (XSAVEOPT, XSAVEC, ...).
    LeafDs1Eax,
    /// Leaf 0x80000001, ECX.
    Ext1Ecx,
    /// Leaf 0x80000001, EDX.
    Ext1Edx,
    /// Leaf 0x80000008, EBX.
    Ext8Ebx,
}

impl FeatureWord {
    const ALL: [FeatureWord; 11] = [
        FeatureWord::Leaf1Ecx,
        FeatureWord::Leaf1Edx,
        FeatureWord::Leaf7Ebx,
        FeatureWord::Leaf7Ecx,
        FeatureWord::Leaf7Edx,
        FeatureWord::Leaf7s1Eax,
        FeatureWord::LeafDEax,
        FeatureWord::LeafDs1Eax,
        FeatureWord::Ext1Ecx,
        FeatureWord::Ext1Edx,
        FeatureWord::Ext8Ebx,
    ];

    /// `(leaf, subleaf, register index: 0=EAX 1=EBX 2=ECX 3=EDX)`.
    fn location(self) -> (u32, u32, usize) {
        match self {
            FeatureWord::Leaf1Ecx => (1, 0, 2),
            FeatureWord::Leaf1Edx => (1, 0, 3),
            FeatureWord::Leaf7Ebx => (7, 0, 1),
            FeatureWord::Leaf7Ecx => (7, 0, 2),
            FeatureWord::Leaf7Edx => (7, 0, 3),
            FeatureWord::Leaf7s1Eax => (7, 1, 0),
            FeatureWord::LeafDEax => (0xd, 0, 0),
            FeatureWord::LeafDs1Eax => (0xd, 1, 0),
            FeatureWord::Ext1Ecx => (0x8000_0001, 0, 2),
            FeatureWord::Ext1Edx => (0x8000_0001, 0, 3),
            FeatureWord::Ext8Ebx => (0x8000_0008, 0, 1),
        }
    }

    /// Bits that describe the current CPU state rather than capabilities (OSXSAVE, OSPKE).
    fn dynamic_bits(self) -> u32 {
        match self {
            FeatureWord::Leaf1Ecx => 1 << 27,
            FeatureWord::Leaf7Ecx => 1 << 4,
            _ => 0,
        }
    }
}

/// Names of well-known feature bits, for messages an operator can act on.
const NAMES: &[(FeatureWord, u32, &str)] = &[
    (FeatureWord::Leaf1Ecx, 0, "sse3"),
    (FeatureWord::Leaf1Ecx, 1, "pclmulqdq"),
    (FeatureWord::Leaf1Ecx, 9, "ssse3"),
    (FeatureWord::Leaf1Ecx, 12, "fma"),
    (FeatureWord::Leaf1Ecx, 13, "cx16"),
    (FeatureWord::Leaf1Ecx, 19, "sse4.1"),
    (FeatureWord::Leaf1Ecx, 20, "sse4.2"),
    (FeatureWord::Leaf1Ecx, 21, "x2apic"),
    (FeatureWord::Leaf1Ecx, 22, "movbe"),
    (FeatureWord::Leaf1Ecx, 23, "popcnt"),
    (FeatureWord::Leaf1Ecx, 24, "tsc-deadline"),
    (FeatureWord::Leaf1Ecx, 25, "aes"),
    (FeatureWord::Leaf1Ecx, 26, "xsave"),
    (FeatureWord::Leaf1Ecx, 28, "avx"),
    (FeatureWord::Leaf1Ecx, 29, "f16c"),
    (FeatureWord::Leaf1Ecx, 30, "rdrand"),
    (FeatureWord::Leaf1Ecx, 31, "hypervisor"),
    (FeatureWord::Leaf1Edx, 0, "fpu"),
    (FeatureWord::Leaf1Edx, 4, "tsc"),
    (FeatureWord::Leaf1Edx, 5, "msr"),
    (FeatureWord::Leaf1Edx, 6, "pae"),
    (FeatureWord::Leaf1Edx, 8, "cx8"),
    (FeatureWord::Leaf1Edx, 9, "apic"),
    (FeatureWord::Leaf1Edx, 11, "sep"),
    (FeatureWord::Leaf1Edx, 13, "pge"),
    (FeatureWord::Leaf1Edx, 15, "cmov"),
    (FeatureWord::Leaf1Edx, 16, "pat"),
    (FeatureWord::Leaf1Edx, 19, "clflush"),
    (FeatureWord::Leaf1Edx, 23, "mmx"),
    (FeatureWord::Leaf1Edx, 24, "fxsr"),
    (FeatureWord::Leaf1Edx, 25, "sse"),
    (FeatureWord::Leaf1Edx, 26, "sse2"),
    (FeatureWord::Leaf7Ebx, 0, "fsgsbase"),
    (FeatureWord::Leaf7Ebx, 3, "bmi1"),
    (FeatureWord::Leaf7Ebx, 5, "avx2"),
    (FeatureWord::Leaf7Ebx, 7, "smep"),
    (FeatureWord::Leaf7Ebx, 8, "bmi2"),
    (FeatureWord::Leaf7Ebx, 9, "erms"),
    (FeatureWord::Leaf7Ebx, 10, "invpcid"),
    (FeatureWord::Leaf7Ebx, 16, "avx512f"),
    (FeatureWord::Leaf7Ebx, 17, "avx512dq"),
    (FeatureWord::Leaf7Ebx, 18, "rdseed"),
    (FeatureWord::Leaf7Ebx, 19, "adx"),
    (FeatureWord::Leaf7Ebx, 20, "smap"),
    (FeatureWord::Leaf7Ebx, 23, "clflushopt"),
    (FeatureWord::Leaf7Ebx, 24, "clwb"),
    (FeatureWord::Leaf7Ebx, 29, "sha"),
    (FeatureWord::Leaf7Ebx, 30, "avx512bw"),
    (FeatureWord::Leaf7Ebx, 31, "avx512vl"),
    (FeatureWord::Leaf7Ecx, 1, "avx512vbmi"),
    (FeatureWord::Leaf7Ecx, 3, "pku"),
    (FeatureWord::Leaf7Ecx, 8, "gfni"),
    (FeatureWord::Leaf7Ecx, 9, "vaes"),
    (FeatureWord::Leaf7Ecx, 10, "vpclmulqdq"),
    (FeatureWord::Leaf7Ecx, 22, "rdpid"),
    (FeatureWord::Leaf7Edx, 4, "fsrm"),
    (FeatureWord::Leaf7Edx, 22, "amx-bf16"),
    (FeatureWord::Leaf7Edx, 24, "amx-tile"),
    (FeatureWord::Leaf7s1Eax, 4, "avx-vnni"),
    (FeatureWord::LeafDEax, 2, "xsave-avx-state"),
    (FeatureWord::LeafDEax, 5, "xsave-avx512-opmask"),
    (FeatureWord::LeafDs1Eax, 0, "xsaveopt"),
    (FeatureWord::LeafDs1Eax, 1, "xsavec"),
    (FeatureWord::LeafDs1Eax, 3, "xsaves"),
    (FeatureWord::Ext1Ecx, 0, "lahf-lm"),
    (FeatureWord::Ext1Ecx, 5, "abm"),
    (FeatureWord::Ext1Ecx, 6, "sse4a"),
    (FeatureWord::Ext1Edx, 11, "syscall"),
    (FeatureWord::Ext1Edx, 20, "nx"),
    (FeatureWord::Ext1Edx, 26, "pdpe1gb"),
    (FeatureWord::Ext1Edx, 27, "rdtscp"),
    (FeatureWord::Ext1Edx, 29, "lm"),
];

/// A feature bit by location, with its name where known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Register it lives in.
    pub word: FeatureWord,
    /// Bit index.
    pub bit: u32,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES
            .iter()
            .find(|(word, bit, _)| *word == self.word && *bit == self.bit)
        {
            Some((_, _, name)) => f.write_str(name),
            None => {
                let (leaf, subleaf, reg) = self.word.location();
                let reg = ["eax", "ebx", "ecx", "edx"][reg];
                write!(f, "cpuid[{leaf:#x}.{subleaf}].{reg}[{}]", self.bit)
            }
        }
    }
}

/// The feature flags of a CPUID table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    words: BTreeMap<FeatureWord, u32>,
}

impl CpuFeatures {
    /// Extracts the feature words from CPUID entries (absent leaves count as zero).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut words = BTreeMap::new();
        for word in FeatureWord::ALL {
            let (leaf, subleaf, reg) = word.location();
            let value = entries
                .iter()
                .find(|e| e.function == leaf && e.index == subleaf)
                .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg]);
            words.insert(word, value & !word.dynamic_bits());
        }
        CpuFeatures { words }
    }

    /// The value of one feature word.
    pub fn word(&self, word: FeatureWord) -> u32 {
        self.words.get(&word).copied().unwrap_or(0)
    }

    /// Features this set has that `host` lacks; empty means `host` can run it.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<Feature> {
        let mut missing = Vec::new();
        for word in FeatureWord::ALL {
            let lacking = self.word(word) & !host.word(word);
            for bit in 0..32 {
                if lacking & (1 << bit) != 0 {
                    missing.push(Feature { word, bit });
                }
            }
        }
        missing
    }

    /// Number of feature bits set.
    pub fn count(&self) -> u32 {
        self.words.values().map(|w| w.count_ones()).sum()
    }

    /// Names of the known features that are set, for display.
    pub fn names(&self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(word, bit, _)| self.word(*word) & (1 << bit) != 0)
            .map(|(_, _, name)| *name)
            .collect()
    }

    /// A copy with one feature bit cleared (to model a weaker host in tests and demos).
    pub fn without(mut self, name: &str) -> Option<Self> {
        let (word, bit, _) = NAMES.iter().find(|(_, _, n)| *n == name)?;
        *self.words.entry(*word).or_default() &= !(1 << bit);
        Some(self)
    }
}

/// Clears the named features in a CPUID table (a host baseline, like vSphere's EVC: VMs
/// created with it can move to hosts that lack those features). Unknown names are an error.
pub fn hide_features(entries: &mut [kvm_cpuid_entry2], names: &[String]) -> Result<(), String> {
    for name in names {
        let (word, bit, _) = NAMES
            .iter()
            .find(|(_, _, n)| n == name)
            .ok_or_else(|| format!("unknown CPU feature '{name}'"))?;
        let (leaf, subleaf, reg) = word.location();
        for entry in entries
            .iter_mut()
            .filter(|e| e.function == leaf && e.index == subleaf)
        {
            let register = match reg {
                0 => &mut entry.eax,
                1 => &mut entry.ebx,
                2 => &mut entry.ecx,
                _ => &mut entry.edx,
            };
            *register &= !(1 << bit);
        }
    }
    Ok(())
}

/// Whether `name` is a CPU feature name this module knows.
pub fn is_known_feature(name: &str) -> bool {
    NAMES.iter().any(|(_, _, n)| *n == name)
}

/// Why a VM cannot run on a host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the host lacks CPU features the VM was given: {}", .missing.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", "))]
pub struct IncompatibleCpu {
    /// The missing features.
    pub missing: Vec<Feature>,
}

/// Checks that `host` offers every feature of `vm`.
pub fn check_compatible(vm: &CpuFeatures, host: &CpuFeatures) -> Result<(), IncompatibleCpu> {
    let missing = vm.missing_on(host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(IncompatibleCpu { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn subset_is_compatible_and_superset_names_what_is_missing() {
        let host = CpuFeatures::from_cpuid(&[
            entry(1, 0, [0, 0, (1 << 28) | (1 << 26), 1 << 25]),
            entry(7, 0, [0, 1 << 5, 0, 0]),
        ]);
        let vm = CpuFeatures::from_cpuid(&[entry(1, 0, [0, 0, 1 << 26, 1 << 25])]);
        assert_eq!(check_compatible(&vm, &host), Ok(()));
        let err = check_compatible(&host, &vm).unwrap_err();
        assert_eq!(err.missing.len(), 2);
        let text = err.to_string();
        assert!(text.contains("avx") && text.contains("avx2"), "{text}");
    }

    #[test]
    fn dynamic_bits_are_ignored_and_unknown_bits_are_named_by_location() {
        let a = CpuFeatures::from_cpuid(&[entry(1, 0, [0, 0, 1 << 27, 0])]);
        assert_eq!(a.count(), 0, "OSXSAVE reflects CR4, not a capability");
        let b = CpuFeatures::from_cpuid(&[entry(7, 0, [0, 0, 0, 1 << 1])]);
        let missing = b.missing_on(&CpuFeatures::default());
        assert_eq!(missing[0].to_string(), "cpuid[0x7.0].edx[1]");
    }

    #[test]
    fn hiding_features_clears_their_bits() {
        let mut entries = vec![entry(1, 0, [0, 0, (1 << 28) | (1 << 26), 0])];
        hide_features(&mut entries, &["avx".to_string()]).unwrap();
        assert_eq!(entries[0].ecx, 1 << 26);
        assert!(hide_features(&mut entries, &["bogus".to_string()]).is_err());
        assert!(is_known_feature("avx2") && !is_known_feature("bogus"));
    }

    #[test]
    fn without_clears_a_named_feature() {
        let full = CpuFeatures::from_cpuid(&[entry(1, 0, [0, 0, 1 << 28, 0])]);
        let weaker = full.clone().without("avx").unwrap();
        assert!(!weaker.names().contains(&"avx"));
        assert!(check_compatible(&full, &weaker).is_err());
        assert!(full.without("no-such-feature").is_none());
    }
}
