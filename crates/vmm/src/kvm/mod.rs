//! The KVM side: the VM (capabilities, MSR filter, irqchip, memory slots), its vCPUs, and
//! the CPUID they are given.

pub mod cpuid;
pub mod msr_filter;
pub mod vcpu;
pub mod vcpu_setup;
pub mod vm;
