//! The KVM side: the VM (capabilities, MSR filter, irqchip, memory) and its vCPUs.

pub mod msr_filter;
pub mod vcpu;
pub mod vm;
