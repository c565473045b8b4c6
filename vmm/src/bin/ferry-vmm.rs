//! `ferry-vmm vmm --socket PATH`: one VM's VMM process, as hostd starts it (hostd runs its
//! own executable the same way; this binary is the VMM alone, for tests and tools).

fn main() {
    ferry_vmm::run_if_vmm();
    eprintln!("usage: ferry-vmm vmm --socket PATH");
    std::process::exit(2);
}
