pub mod marimo;
